"""ACTMat and WUDI: fp64 references, FusionBench parity, and memory independent of expert count."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

SHAPES = [(64, 48), (48, 64), (96, 96)]


def _task_vectors(shape, n, seed=0, rank=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
        out.append(1e-3 * (low + 0.05 * torch.randn(*shape, generator=g)))
    return out


def _defaults(name, **over):
    shared = {p.name: p.default for p in METHODS[name].params}
    shared.update(over)
    return shared


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def actmat_reference(deltas):
    d = torch.stack([x.double() for x in deltas])
    c = d.transpose(1, 2) @ d
    return (d @ c).sum(0) @ torch.linalg.pinv(c.sum(0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_actmat_matches_fp64_pinv_formula(shape, n):
    deltas = _task_vectors(shape, n, seed=n)
    base = torch.randn(*shape) * 0.02
    experts = [base + d for d in deltas]
    out = METHODS["actmat"].fn(base.double(), [e.double() for e in experts], MergeArgs(_defaults("actmat"), [{}] * n))
    ref = base.double() + actmat_reference([e.double() - base.double() for e in experts])
    assert _rel(out - base.double(), ref - base.double()) <= 1e-6


def test_actmat_weight_mode_is_projection_plus_delta():
    deltas = _task_vectors((40, 64), 3, rank=4)  # rank-deficient S: weight mode differs from delta mode
    base = torch.randn(40, 64, dtype=torch.float64)
    experts = [base + d.double() for d in deltas]
    out = METHODS["actmat"].fn(base, experts, MergeArgs(_defaults("actmat", merge_mode="weight"), [{}] * 3))
    ws = torch.stack(experts)
    cs = torch.stack([d.double().T @ d.double() for d in deltas])
    ref = (ws @ cs).sum(0) @ torch.linalg.pinv(cs.sum(0))
    assert _rel(out, ref) <= 1e-6


def _fb_wudi(deltas, iters):
    from fusion_bench.method.wudi.wudi import wudi_merging

    tvs = [{"w": d.clone()} for d in deltas]
    return wudi_merging(tvs, accelerator="cpu", iter_num=iters)["w"].detach()


@pytest.mark.parametrize("shape", SHAPES)
def test_wudi_adam_matches_fusion_bench(shape):
    n = 8
    deltas = _task_vectors(shape, n, seed=3)
    zero = torch.zeros(shape)
    ours = METHODS["wudi"].fn(zero, deltas, MergeArgs(_defaults("wudi"), [{}] * n))
    ref = _fb_wudi(deltas, 300)
    assert _rel(ours, ref) <= 1e-4
    assert _rel(ours, sum(deltas)) > 1e-3  # Adam moved away from the sum initialisation


def test_wudi_closed_forms_against_fp64():
    deltas = [d.double() for d in _task_vectors((64, 48), 4, seed=5)]
    zero = torch.zeros(64, 48, dtype=torch.float64)
    w = [1 / (d * d).sum() for d in deltas]
    S = sum(wi * d.T @ d for wi, d in zip(w, deltas))
    R = sum(wi * d @ d.T @ d for wi, d in zip(w, deltas))
    M0 = sum(deltas)
    exact = R @ torch.linalg.pinv(S)
    closed = METHODS["wudi"].fn(zero, deltas, MergeArgs(_defaults("wudi", solver="closed_form"), [{}] * 4))
    assert _rel(closed, exact) <= 1e-6
    # exponential filter == gradient flow dM/dτ = -(M S - R) run for time t, from M0
    t = 50.0
    lam, V = torch.linalg.eigh(S)
    flow = M0 @ V @ torch.diag(torch.exp(-lam * t)) @ V.T + exact @ V @ torch.diag(1 - torch.exp(-lam * t)) @ V.T
    spec = METHODS["wudi"].fn(zero, deltas, MergeArgs(_defaults("wudi", solver="spectral", t=t), [{}] * 4))
    assert _rel(spec, flow) <= 1e-6
    # long times converge to the exact minimiser
    far = METHODS["wudi"].fn(zero, deltas, MergeArgs(_defaults("wudi", solver="spectral", t=1e9), [{}] * 4))
    assert _rel(far, exact) <= 1e-6
    # adaptive: K = ceil((Σ√λ)²/Σλ) directions solved exactly, the rest left at M0
    lam_pos = lam.clamp(min=0)
    k = int(torch.ceil(lam_pos.sqrt().sum() ** 2 / lam_pos.sum()))
    Vk = V[:, torch.argsort(lam, descending=True)[:k]]
    P = Vk @ Vk.T
    ref = M0 - M0 @ P + R @ Vk @ torch.diag(1 / lam[torch.argsort(lam, descending=True)[:k]]) @ Vk.T
    ada = METHODS["wudi"].fn(zero, deltas, MergeArgs(_defaults("wudi", solver="adaptive"), [{}] * 4))
    assert 1 <= k < 48 and _rel(ada, ref) <= 1e-6


class _Counting:
    """A lazy expert sequence that records the peak number of experts alive at once."""

    def __init__(self, deltas):
        self.deltas = deltas
        self.alive = 0
        self.peak = 0

    def __len__(self):
        return len(self.deltas)

    def __iter__(self):
        for d in self.deltas:
            t = d.clone()
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            try:
                yield t
            finally:
                self.alive -= 1


def _peak_bytes(method, n, shape=(256, 192)):
    """Peak bytes torch allocated on CPU while ``method`` merges ``n`` experts (via the profiler)."""
    deltas = _task_vectors(shape, n, seed=11)
    base = torch.zeros(shape)
    stream = _Counting(deltas)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        METHODS[method].fn(
            base, stream, MergeArgs(_defaults(method, steps=5) if method == "wudi" else _defaults(method), [{}] * n)
        )
    live = peak = 0
    # Each op's *self* allocations, plus "[memory]" records for frees outside any op, in time order.
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, stream.peak


@pytest.mark.parametrize("method", ["actmat", "wudi"])
def test_gram_memory_independent_of_expert_count(method):
    p2, alive2 = _peak_bytes(method, 2)
    p8, alive8 = _peak_bytes(method, 8)
    assert alive2 == alive8 == 1  # one expert held at a time
    one_matrix = 256 * 192 * 8
    assert p2 > 4 * one_matrix  # the measurement sees the method's buffers
    assert p8 <= p2 + one_matrix, (p2, p8)


def test_engine_actmat_end_to_end(family, tmp_path):
    base, experts = family
    recipe = parse_recipe(recipe_text("actmat", base, experts))
    merge(recipe, tmp_path / "out", progress=False)
    out, b = load_dir(tmp_path / "out"), load_dir(base)
    es = [load_dir(e) for e in experts]
    name = "model.layers.1.mlp.down_proj.weight"
    ref = b[name].double() + actmat_reference([e[name].double() - b[name].double() for e in es])
    assert _rel(out[name] - b[name], ref - b[name].double()) <= 1e-5
    for k in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        mean = sum(e[k].double() for e in es) / 3
        assert (out[k].double() - mean).abs().max() <= 1e-6, k


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_gram_methods_on_cuda(tf32, precision):
    """ACTMat and WUDI on CUDA against the fp64 CPU references; the bound depends on the precision.

    ``tf32`` is also the process-wide switch during ACTMat: it must not leak into the statistics
    (with TF32 in S, the pseudo-inverse gave 105 % relative error on an H100).
    """
    deltas = _task_vectors((96, 96), 8, seed=8)
    zero = torch.zeros(96, 96, device="cuda")
    dev = [d.cuda() for d in deltas]
    args = MergeArgs(_defaults("actmat", precision=precision), [{}] * 8)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out = METHODS["actmat"].fn(zero, dev, args).cpu()
        assert torch.backends.cuda.matmul.allow_tf32 == tf32  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    ref = actmat_reference(deltas)
    fp64 = precision == "auto" and torch.cuda.get_device_capability() in {(8, 0), (9, 0), (10, 0)}
    assert _rel(out, ref) <= (1e-6 if fp64 else 1e-2)
    w = METHODS["wudi"].fn(zero, dev, MergeArgs(_defaults("wudi", precision=precision, tf32=tf32), [{}] * 8)).cpu()
    assert _rel(w, _fb_wudi(deltas, 300)) <= (1e-4 if not tf32 else 1e-2)
