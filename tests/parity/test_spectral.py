"""TSV-M, Iso-C and Iso-CTS against FusionBench's own functions on identical task vectors.

FusionBench (``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``) takes lists of task-
vector state dicts, so it is called directly. Task vectors are formed in fp32 (as FusionBench
subtracts fp32 state dicts) and then handed to it in fp64, which it keeps: its fp32 run is itself
up to 2e-5 away from its fp64 run on these matrices, so only the fp64 run is a reference that a
1e-5 bound can be held to. The bound is on the merged task vector, ‖ours − FB‖/‖FB‖.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import weakref

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs, WorkShape
from raymerge.engine.methods.spectral import iso_cts_split, tsv_rank
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

# tall, wide, square; for Iso-CTS at f = 0.8 every one leaves r − k_c indivisible by some T
# (r = 40: 8 over T = 3; r = 64: 13 over T = 2, 3, 8 — 6.5 rounds half-to-even down to 6).
SHAPES = [(96, 40), (40, 96), (64, 64), (130, 70)]
TASKS = [2, 3, 8]
EXCLUDE = ["model.embed_tokens.weight", "lm_head.weight"]  # what the engine sends to the fallback


def _fb_merged_tv(method: str, task_vectors: list[dict], fraction: float = 0.8, exclude=None) -> dict:
    """FusionBench's merged task vector (before its scaling factor) for state dicts of task vectors."""
    pytest.importorskip("fusion_bench")  # always installed for CI; the GPU image may lack it
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per key
        if method == "tsv_m":
            return compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=exclude, accelerator="cpu")
        if method == "iso_c":
            return iso_c(task_vectors, accelerator="cpu", exclude_keys=exclude)
        return iso_cts(task_vectors, fraction, accelerator="cpu", exclude_keys=exclude)


def _problem(shape, n, seed):
    """fp32 base and experts whose task vectors are low-rank plus dense noise (a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(*shape, generator=g)
    experts = []
    for _ in range(n):
        low = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g) / 2
        experts.append(base + 4e-3 * (low + torch.randn(*shape, generator=g)))
    return base, experts


def _args(method, n, **over):
    shared = {p.name: p.default for p in METHODS[method].params}
    shared.update(over)
    return MergeArgs(shared, [{}] * n, tensor_name="w")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _reference(method, base, experts, fraction=0.8):
    taus = [{"w": (x - base).double()} for x in experts]  # fp32 subtraction, as FusionBench does
    return _fb_merged_tv(method, taus, fraction)["w"]


def _check_parity(method, shape, n, device, bound=1e-5, seed=None, **over):
    base, experts = _problem(shape, n, seed=seed if seed is not None else 1000 * n + shape[0])
    ref = _reference(method, base, experts, over.get("common_space_fraction", 0.8))
    out = METHODS[method].fn(base.to(device), [x.to(device) for x in experts], _args(method, n, **over))
    assert out.dtype == torch.float32 and out.device.type == torch.device(device).type
    err = _rel(out.cpu() - base, ref)
    assert err <= bound, (method, shape, n, err)
    return err


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n", TASKS)
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_parity_with_fusion_bench(method, shape, n):
    _check_parity(method, shape, n, "cpu")


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_alpha_scales_after_the_svd(method):
    base, experts = _problem((64, 48), 3, seed=5)
    ref = _reference(method, base, experts)
    out = METHODS[method].fn(base, experts, _args(method, 3, alpha=1.5))
    assert _rel(out - base, 1.5 * ref) <= 1e-5


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_iso_cts_other_common_fractions(fraction):
    _check_parity("iso_cts", (64, 64), 3, "cpu", common_space_fraction=fraction)


def test_iso_cts_split_follows_fusion_bench_rounding():
    assert iso_cts_split(64, 2, 0.8) == (52, 6)  # 13 / 2 = 6.5 rounds half-to-even to 6
    assert iso_cts_split(64, 8, 0.8) == (48, 2)  # 13 / 8 rounds up: the common space shrinks
    assert iso_cts_split(40, 3, 0.8) == (31, 3)
    assert iso_cts_split(100, 4, 0.8) == (80, 5)  # divisible: no adjustment
    assert iso_cts_split(5, 3, 0.0) == (2, 1)  # FusionBench would need −1 common dims; one block less


def test_tsv_rank_uses_fusion_bench_float_rule():
    assert tsv_rank(98, 49) == 1  # int(98 * (1/49)) = int(1.9999999999999998), not 98 // 49 = 2
    assert tsv_rank(64, 3) == 21
    _check_parity("tsv_m", (98, 120), 49, "cpu")  # FusionBench keeps one triplet per task here too


def test_tsv_more_tasks_than_rank_gives_base():
    base, experts = _problem((49, 60), 49, seed=3)  # int(49 * (1/49)) = 0 triplets per task
    out = METHODS["tsv_m"].fn(base, experts, _args("tsv_m", 49))
    assert torch.equal(out, base)
    assert _reference("tsv_m", base, experts).abs().max() == 0


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_fp32_precision_is_close(method):
    # Opting into fp32 SVDs lands where FusionBench's own fp32 run does: within ~1e-4, not 1e-5.
    _check_parity(method, (130, 70), 8, "cpu", bound=1e-4, precision="fp32")


def test_bad_common_fraction_is_refused():
    from raymerge.engine.errors import RecipeError

    base, experts = _problem((16, 8), 2, seed=0)
    with pytest.raises(RecipeError, match="common_space_fraction"):
        METHODS["iso_cts"].fn(base, experts, _args("iso_cts", 2, common_space_fraction=1.5))


def _count_svds(monkeypatch):
    calls = []
    real = torch.linalg.svd

    def counting(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    return calls


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_gram_path_matches_exact_svd(method, shape, monkeypatch):
    # Well-conditioned inputs: `svd: auto` (fp64) takes the eigh-of-Gram path end to end, no SVD at
    # all (but Iso-C's square sum), and lands within 1e-9 of the exact SVD path and 1e-5 of FusionBench.
    base, experts = _problem(shape, 3, seed=11)
    exact = METHODS[method].fn(base.double(), [x.double() for x in experts], _args(method, 3, svd="exact"))
    calls = _count_svds(monkeypatch)
    fast = METHODS[method].fn(base.double(), [x.double() for x in experts], _args(method, 3))
    square_sum = method == "iso_c" and shape[0] == shape[1]  # goes straight to the SVD (see iso_c)
    assert calls == ([shape] if square_sum else [])
    assert _rel(fast - base.double(), exact - base.double()) <= 1e-9
    _check_parity(method, shape, 3, "cpu")


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_gram_path_falls_back_to_the_svd_on_rank_deficient_inputs(method, monkeypatch):
    # Rank-2 task vectors (a LoRA-style fine-tune stored in fp64): the Gram matrices are singular,
    # so every step that would need their tiny eigenvalues hands over to the exact SVD and the
    # result stays where the exact path puts it.
    g = torch.Generator().manual_seed(4)
    rows, cols, n = 48, 40, 3
    base = 0.02 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    experts = [
        base
        + torch.randn(rows, 2, generator=g, dtype=torch.float64)
        @ torch.randn(2, cols, generator=g, dtype=torch.float64)
        * 1e-2
        for _ in range(n)
    ]
    exact = METHODS[method].fn(base, experts, _args(method, n, svd="exact"))
    calls = _count_svds(monkeypatch)
    fast = METHODS[method].fn(base, experts, _args(method, n))
    assert calls, "rank-deficient input must reach the exact SVD"
    assert torch.isfinite(fast).all()
    assert _rel(fast - base, exact - base) <= 1e-6


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_fp32_never_takes_the_gram_path(method, monkeypatch):
    base, experts = _problem((64, 48), 3, seed=2)
    calls = _count_svds(monkeypatch)
    METHODS[method].fn(base, experts, _args(method, 3, precision="fp32"))
    assert calls  # squaring the condition number in fp32 is not safe: the exact SVD runs


class _Tracked:
    """A lazy expert sequence (like ``ExpertStream``) that records, at every read, how many of the
    tensors it handed out earlier are still alive, and how many reads there were."""

    def __init__(self, experts):
        self.experts = experts
        self.handed: list[weakref.ref] = []
        self.max_alive_at_read = 0
        self.reads = 0

    def __len__(self):
        return len(self.experts)

    def __getitem__(self, i):
        gc.collect()
        alive = sum(r() is not None for r in self.handed)
        self.max_alive_at_read = max(self.max_alive_at_read, alive)
        self.reads += 1
        t = self.experts[i].clone()
        self.handed.append(weakref.ref(t))
        return t

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


@pytest.mark.parametrize(("method", "passes"), [("tsv_m", 1), ("iso_c", 1), ("iso_cts", 2), ("mean_task_vector", 1)])
def test_streams_one_expert_at_a_time(method, passes):
    base, experts = _problem((48, 40), 4, seed=9)
    stream = _Tracked(experts)
    METHODS[method].fn(base, stream, _args(method, 4))
    assert stream.max_alive_at_read == 0  # the previous expert is gone before the next is read
    assert stream.reads == passes * 4
    assert METHODS[method].streams_experts


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tsv_m", {}),
        ("iso_c", {"alpha": 1.5}),  # also checks that norms and embeddings get base + alpha·mean τ
        ("iso_cts", {"common_space_fraction": 0.8}),
    ],
)
def test_engine_end_to_end_matches_fusion_bench(family, tmp_path, method, params):
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    base, experts = family
    merge(parse_recipe(recipe_text(method, base, experts, params or None)), tmp_path / "out", progress=False)
    out, b = load_dir(tmp_path / "out"), load_dir(base)
    es = [load_dir(e) for e in experts]
    taus = [{k: v.double() for k, v in state_dict_sub(e, b).items()} for e in es]
    alpha = float(params.get("alpha", 1.0))
    merged = _fb_merged_tv(method, taus, exclude=EXCLUDE)
    b64 = {k: v.double() for k, v in b.items()}
    ref = state_dict_add(b64, state_dict_mul(merged, alpha))
    assert set(out) == set(ref)
    n_linear = 0
    for k in out:
        assert out[k].dtype == torch.float32, k
        assert _rel(out[k], ref[k]) <= 1e-5, k
        if out[k].ndim == 2 and k not in EXCLUDE:
            # the merged task vector itself, for the SVD path (a fallback tensor's task vector is
            # too small next to its weights for fp32 output to hold it to 1e-5: norms are ~1 ± 0.004)
            err = _rel(out[k] - b[k], ref[k] - b64[k])
            assert err <= 1e-5, (k, err)
            n_linear += 1
        else:
            assert (out[k].double() - ref[k]).abs().max() <= 1e-6, k
    assert n_linear == 14  # 7 linear weights in each of 2 layers went through the SVD path
    if alpha == 1.0:  # norms, embeddings and lm_head are the plain mean of the experts
        for k in ("model.norm.weight", "model.layers.0.input_layernorm.weight", *EXCLUDE):
            mean = sum(e[k].double() for e in es) / len(es)
            assert (out[k].double() - mean).abs().max() <= 1e-6, k


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_plan_estimates_cover_the_svd_work(method):
    spec = METHODS[method]
    assert spec.applies_to == frozenset({"linear"}) and spec.fallback == "mean_task_vector"
    assert spec.prefers_accelerator and spec.flops is not None
    rows, cols = 4096, 1024
    n = rows * cols
    shape = WorkShape(n, n, (rows, cols), 256, 9, 8, 4, 4, 4)
    # at least the inputs, the fp64 task vector and its two factors, on CPU and on an accelerator
    svd_work = 8 * (n + n + cols * cols)
    assert spec.footprint(shape, False).host >= 9 * 4 * n + svd_work
    assert spec.footprint(shape, True).device >= 4 * n + svd_work
    assert spec.flops((rows, cols), 8) > 8 * rows * cols * cols


# ---- CUDA ----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def _global_tf32(enabled):
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n", TASKS)
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_parity_with_fusion_bench_cuda(method, shape, n, tf32):
    # In fp64 the process-wide TF32 switch must not matter.
    with _global_tf32(tf32):
        _check_parity(method, shape, n, "cuda", precision="fp64")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_auto_precision_on_cuda(method):
    # auto is fp64 on full-rate-FP64 GPUs (A100/H100/H200/B200) and fp32 elsewhere.
    from raymerge.engine.methods.spectral import solve_dtype

    fp64 = solve_dtype("auto", torch.device("cuda")) == torch.float64
    with _global_tf32(True):
        _check_parity(method, (130, 70), 8, "cuda", bound=1e-5 if fp64 else 1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_fp32_on_cuda_keeps_tf32_off_unless_asked(method):
    with _global_tf32(True):  # the method's own tf32=false must win over the global switch
        _check_parity(method, (130, 70), 8, "cuda", bound=1e-4, precision="fp32")
        assert torch.backends.cuda.matmul.allow_tf32  # and the switch is restored afterwards


# ---- Newton's polar iteration (the accelerator's path where the Gram path fails) ----------------


def _with_spectrum(m, k, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, k)
    u = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, r, dtype=torch.float64, generator=g))[0]
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u @ v.T


@pytest.mark.parametrize("shape", [(200, 200), (300, 120), (120, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cond", [1e2, 1e6, 1e9])
def test_newton_polar_is_as_accurate_as_the_svd(shape, cond):
    from raymerge.engine.methods.polar import polar_newton

    a, truth = _with_spectrum(*shape, cond)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    svd_err = _rel(u @ vh, truth)
    p = polar_newton(a)
    assert p is not None
    assert _rel(p, truth) <= max(10 * svd_err, 1e-13), (shape, cond, _rel(p, truth), svd_err)


def test_newton_polar_hands_nearly_singular_matrices_to_the_svd():
    from raymerge.engine.methods.polar import polar_newton

    assert polar_newton(_with_spectrum(150, 150, 1e13)[0]) is None
    assert polar_newton(torch.zeros(40, 40, dtype=torch.float64)) is None


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_newton_path_matches_fusion_bench(method, monkeypatch):
    """With the iteration enabled on CPU (it runs on accelerators) and the Gram path failing, as it
    does on large square factor matrices and always on Iso-C's square sums, the methods still
    match FusionBench."""
    from raymerge.engine.methods import polar

    monkeypatch.setattr(polar, "NEWTON_ON_CPU", True)
    monkeypatch.setattr(polar, "_polar_gram", lambda a: None)
    calls = []
    real = polar.polar_newton
    monkeypatch.setattr(polar, "polar_newton", lambda a: calls.append(a.shape) or real(a))
    _check_parity(method, (96, 96), 8, "cpu", precision="fp64")
    assert calls, "the iteration did not run"
