"""ACTMat and WUDI's closed forms on LoRA experts in factored form (``methods.gram_lora``).

Every expert Δ_t = s_t B_t A_t: the factored path solves in the span of the stacked A's and must
equal the dense path (the same chunked function reading rows of base + s·B·A) to ≤ 1e-6 relative
on the merged task vector, directly on in-memory factors and through a recipe of PEFT adapters;
and the dense fp64 formula with Δ_t formed exactly.
"""

from __future__ import annotations

import pytest
import torch
from test_gram import _defaults, _rel

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, InMemorySource, MergeArgs, gram_lora
from raymerge.engine.methods.gram_lora import Factors, factored_applies
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir

CASES = [
    ("actmat", {}),
    ("actmat", {"merge_mode": "weight"}),
    ("actmat", {"ridge": 0.1}),
    ("actmat", {"rcond": 1e-6, "lambda": 0.8}),
    ("wudi", {"solver": "closed_form"}),
    ("wudi", {"solver": "spectral", "t": 50.0}),
    ("wudi", {"solver": "spectral", "keep_fraction": 0.1}),
    ("wudi", {"solver": "adaptive"}),
]


class LoraSource(InMemorySource):
    """In-memory experts base + s·B·A that also offer their factors."""

    def __init__(self, base, facs, chunk_rows):
        super().__init__(base, [base + f.scale * f.B @ f.A for f in facs], chunk_rows)
        self.facs = facs
        self.asked = 0

    def lora_factors(self, t):
        self.asked += 1
        return self.facs[t]


def _factors(shape, ranks, seed, shared_a=False):
    g = torch.Generator().manual_seed(seed)
    out, inn = shape
    a0 = torch.randn(max(ranks), inn, generator=g, dtype=torch.float64)
    facs = []
    for r in ranks:
        a = a0[:r].clone() if shared_a else torch.randn(r, inn, generator=g, dtype=torch.float64)
        facs.append(Factors(a, 1e-2 * torch.randn(out, r, generator=g, dtype=torch.float64), 16.0 / r))
    return facs


@pytest.mark.parametrize("shape", [(70, 50), (40, 90), (64, 64)])
@pytest.mark.parametrize("name,over", CASES)
def test_factored_equals_dense(name, over, shape):
    facs = _factors(shape, (4, 8, 3), seed=shape[0])
    base = torch.randn(*shape, dtype=torch.float64)
    args = MergeArgs(_defaults(name, **over), [{}] * 3)
    src = LoraSource(base, facs, chunk_rows=7)
    factored = src.assemble(METHODS[name].chunked(src, args))
    assert src.asked == 3  # the factored path ran
    dense_src = InMemorySource(base, [base + f.scale * f.B @ f.A for f in facs], chunk_rows=7)
    dense = dense_src.assemble(METHODS[name].chunked(dense_src, args))
    assert _rel(factored - base, dense - base) <= 1e-6


def test_factored_with_linearly_dependent_a_factors():
    """Experts sharing their A rows (the stacked A is rank-deficient): still the dense result."""
    facs = _factors((50, 40), (4, 4, 2), seed=3, shared_a=True)
    base = torch.zeros(50, 40, dtype=torch.float64)
    for name, over in (("actmat", {}), ("wudi", {"solver": "closed_form"})):
        args = MergeArgs(_defaults(name, **over), [{}] * 3)
        src = LoraSource(base, facs, chunk_rows=16)
        got = src.assemble(METHODS[name].chunked(src, args))
        d = torch.stack([f.scale * f.B @ f.A for f in facs])
        w = [1.0] * 3 if name == "actmat" else [1 / float(x.square().sum()) for x in d]
        c = d.transpose(1, 2) @ d
        ref = sum(wi * x @ ci for wi, x, ci in zip(w, d, c)) @ torch.linalg.pinv(sum(wi * ci for wi, ci in zip(w, c)))
        assert _rel(got, ref) <= 1e-6


def test_dense_path_where_factored_does_not_apply():
    assert not factored_applies("actmat", {"trim": 0.5})
    assert not factored_applies("wudi", {"solver": "adam"})
    assert not factored_applies("actmat", {"merge_mode": "weight", "ridge": 0.1})
    assert factored_applies("actmat", {"trim": 1.0}) and factored_applies("wudi", {"solver": "spectral"})
    facs = _factors((30, 20), (2, 3), seed=1)
    src = LoraSource(torch.zeros(30, 20, dtype=torch.float64), facs, chunk_rows=8)
    src.assemble(METHODS["actmat"].chunked(src, MergeArgs(_defaults("actmat", trim=0.5), [{}] * 2)))
    assert src.asked == 0


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from hf_tiny import tiny_llama
    from test_lora_inputs import write_adapter

    root = tmp_path_factory.mktemp("lora_factored")
    base = tiny_llama(root / "base", seed=0)
    return base, [write_adapter(root / f"a{i}", base, r, seed=10 + i) for i, r in enumerate((4, 8, 2))]


@pytest.mark.parametrize("name,over", [("actmat", {}), ("wudi", {"solver": "closed_form"})])
def test_recipe_of_adapters_factored_equals_dense(name, over, adapters, tmp_path, monkeypatch):
    """Through the engine (fp64 compute, so the dense path's base + s·B·A − base is exact enough):
    the factored run equals the dense run, and it did take the factored path."""
    from raymerge.engine.task import TaskChunks

    base, ads = adapters
    params = "".join(f"  {k}: {v}\n" for k, v in over.items())
    text = (
        f"merge_method: {name}\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {base}+{a}\n" for a in ads)
        + (f"parameters:\n{params}" if params else "")
        + "raymerge:\n  compute_dtype: float64\n  device: cpu\n"
    )
    runs = []
    real = gram_lora.factored_merge

    def spy(*a, **k):
        runs.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr("raymerge.engine.methods.gram.factored_merge", spy)
    merge(parse_recipe(text), tmp_path / "factored", progress=False, workers=1)
    assert len(runs) == 6  # q, v and down_proj of 2 layers
    monkeypatch.setattr(TaskChunks, "lora_factors", lambda self, t: None)
    merge(parse_recipe(text), tmp_path / "dense", progress=False, workers=1)
    assert len(runs) == 6
    f, d, b = load_dir(tmp_path / "factored"), load_dir(tmp_path / "dense"), load_dir(base)
    assert set(f) == set(d)
    for k in f:
        if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            assert _rel(f[k].double() - b[k].double(), d[k].double() - b[k].double()) <= 1e-6, k
        else:
            assert torch.equal(f[k], d[k]), k


def test_factored_memory_is_linear_in_total_rank():
    """The declared peak of a factored task: O(K·(in + out)) besides the base and one row block,
    far below the dense O(in² + out·in) on a 70B down_proj (out 8192 × in 28672, 8 bf16 experts)."""
    import dataclasses

    from raymerge.engine.methods import WorkShape

    out, inn, rows = 8192, 28672, (4 << 20) // (28672 * 4)
    dense = WorkShape(out * inn, rows * inn, (out, inn), rows, 9, 8, 2, 4, 2, 8)
    spec = METHODS["actmat"]
    d = spec.footprint(dense, False).host
    k16, k64 = (spec.footprint(dataclasses.replace(dense, lora_rank=k), False).host for k in (8 * 16, 8 * 64))
    assert k16 < d / 20  # 14.1 GiB dense
    per_rank = (k64 - k16) / (8 * 48)
    assert per_rank <= 12 * (inn + out) * 8  # a few in- and out-vectors in fp64 per unit of rank
    for acc in (False, True):
        assert METHODS["wudi"].footprint(dataclasses.replace(dense, lora_rank=128, params={"solver": "spectral"}), acc)


class LazyLora:
    """A lazy expert sequence (base + s·B·A) that also offers the factors, as a task's stream does."""

    def __init__(self, base, facs):
        self.base, self.facs = base, facs

    def __len__(self):
        return len(self.facs)

    def __getitem__(self, t):
        f = self.facs[t]
        return self.base + f.scale * f.B @ f.A

    def lora_factors(self, t):
        return self.facs[t]


@pytest.mark.parametrize(("shape", "ranks"), [((40, 24), (12, 16)), ((24, 40), (8, 10, 12)), ((30, 30), (15, 20))])
def test_tsv_m_factored_equals_dense(shape, ranks):
    """TSV-M from the factors equals the dense SVD path when every τ_t has at least k = int(r/T)
    non-zero singular values (below that the dense path's extra triplets are arbitrary)."""
    facs = _factors(shape, ranks, seed=len(ranks) + shape[0])
    base = torch.randn(*shape, dtype=torch.float64)
    args = MergeArgs(_defaults("tsv_m", svd="exact"), [{}] * len(ranks))
    factored = METHODS["tsv_m"].fn(base, LazyLora(base, facs), args)
    dense = METHODS["tsv_m"].fn(base, [base + f.scale * f.B @ f.A for f in facs], args)
    assert _rel(factored - base, dense - base) <= 1e-6


def test_recipe_of_adapters_tsv_m_factored_equals_dense(tmp_path, monkeypatch):
    """Two adapters of rank ≥ k on every targeted weight of the tiny Llama, through the engine."""
    from hf_tiny import tiny_llama
    from test_lora_inputs import write_adapter

    from raymerge.engine.task import ExpertStream

    base = tiny_llama(tmp_path / "base", seed=0)
    ads = [write_adapter(tmp_path / f"a{i}", base, r, seed=20 + i) for i, r in enumerate((16, 20))]
    text = (
        f"merge_method: tsv_m\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {base}+{a}\n" for a in ads)
        + "raymerge:\n  compute_dtype: float64\n  device: cpu\n"
    )
    calls = []
    real = ExpertStream.lora_factors

    def spy(self, t):
        out = real(self, t)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ExpertStream, "lora_factors", spy)
    merge(parse_recipe(text), tmp_path / "factored", progress=False, workers=1)
    assert sum(calls) == 12  # 2 experts × q, v, down_proj × 2 layers
    monkeypatch.setattr(ExpertStream, "lora_factors", lambda self, t: None)
    merge(parse_recipe(text), tmp_path / "dense", progress=False, workers=1)
    f, d, b = load_dir(tmp_path / "factored"), load_dir(tmp_path / "dense"), load_dir(base)
    for k in f:
        if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            assert _rel(f[k].double() - b[k].double(), d[k].double() - b[k].double()) <= 1e-6, k
        else:
            assert torch.equal(f[k], d[k]), k
