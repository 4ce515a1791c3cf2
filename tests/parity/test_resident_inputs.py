"""Gram tasks that hold their inputs in device memory (``ExpertStream.resident``, on by default on
CUDA for ACTMat and WUDI) give the bytes of the streamed path and read each input once.

CI has no GPU, so these tests switch the resident path on for CPU tasks: the same code runs (the
held copies, their slicing and conversion, the eviction of the expert read before), with
``transfer.move_rows``' CPU loop in place of its pinned CUDA copies (which the gpu-marked memory
and parity tests run on a device).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import raymerge.engine.task as task_mod
from raymerge.engine.errors import CheckpointError
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.storage import open_shard
from raymerge.engine.synth import make_family
from raymerge.engine.task import run_task
from raymerge.engine.transfer import move_rows

from conftest import presize_shards, recipe_text

CASES = {
    "actmat": ("actmat", {}),
    "actmat_streamed": ("actmat", {"inputs_on_device": False}),
    "actmat_trim": ("actmat", {"trim": 0.5}),
    "actmat_weight": ("actmat", {"merge_mode": "weight"}),
    "wudi_adam": ("wudi", {"solver": "adam", "steps": 3}),
    "wudi_spectral": ("wudi", {"solver": "spectral"}),
}
# several row chunks per tensor of the tiny family (bf16 inputs, fp32 compute)
CHUNKED = "raymerge:\n  chunk_bytes: 4096\n"


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("bf16"), "tiny", 3, dtype=torch.bfloat16, seed=5)


def _linear_tasks(method, params, base, experts):
    plan = build_plan(parse_recipe(recipe_text(method, base, experts, params, extra=CHUNKED)))
    tasks = [t for t in plan.tasks if t.method == method and len(t.output.shape) == 2]
    assert tasks and all(len(range(t.row_start, t.row_end, t.chunk_rows)) > 1 for t in tasks)
    return plan, tasks


def _run(plan, tasks, staging, resident, monkeypatch, device="cpu"):
    if device == "cpu":
        monkeypatch.setattr(task_mod, "resident_inputs", lambda task, dev: resident and task_mod.holds_inputs(task))
    presize_shards(staging, plan.shards)
    receipts = {t.tensor: run_task(t, str(staging), device) for t in tasks}
    out = {}
    for t in tasks:
        with open(staging / t.output.shard, "rb") as f:
            f.seek(t.output.offset)
            out[t.tensor] = f.read(t.output.nbytes)
    return out, receipts


@pytest.mark.parametrize("case", list(CASES))
def test_resident_inputs_give_the_streamed_bytes_and_read_once(case, bf16_family, tmp_path, monkeypatch):
    method, params = CASES[case]
    base, experts = bf16_family
    plan, tasks = _linear_tasks(method, params, base, experts)
    streamed, r_streamed = _run(plan, tasks, tmp_path / "streamed", False, monkeypatch)
    held, r_held = _run(plan, tasks, tmp_path / "held", True, monkeypatch)
    for t in tasks:
        assert held[t.tensor] == streamed[t.tensor], t.tensor  # bit for bit
        once = t.read_bytes  # every input's rows of the span, once
        assert r_streamed[t.tensor].read_bytes > 2 * once, t.tensor  # experts twice, the base 2T + 1 times
        if params.get("inputs_on_device", True):
            assert r_held[t.tensor].read_bytes == once, t.tensor
        else:  # planned off: the task streams as on CPU
            assert r_held[t.tensor].read_bytes == r_streamed[t.tensor].read_bytes, t.tensor


def test_resident_inputs_refuse_nan(bf16_family, tmp_path, monkeypatch):
    base, experts = bf16_family
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in experts[1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    name = "model.layers.0.mlp.down_proj.weight"
    shard = next(p for p in bad.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    plan, tasks = _linear_tasks("actmat", {}, base, [experts[0], bad, experts[2]])
    task = next(t for t in tasks if t.tensor == name)
    with pytest.raises(CheckpointError, match="NaN or Inf") as err:
        _run(plan, [task], tmp_path / "staging", True, monkeypatch)
    assert err.value.file is not None and "bad" in err.value.file


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_tasks_hold_inputs_and_match_cpu(case, bf16_family, tmp_path, monkeypatch):
    """On CUDA the tasks hold their inputs on the device (read once, through pinned buffers) and
    give the CPU path's result (fp64 statistics on both; the output is fp32)."""
    method, params = CASES[case]
    base, experts = bf16_family
    plan, tasks = _linear_tasks(method, {**params, "precision": "fp64"}, base, experts)
    cpu, _ = _run(plan, tasks, tmp_path / "cpu", False, monkeypatch)
    gpu, receipts = _run(plan, tasks, tmp_path / "gpu", True, monkeypatch, device="cuda")
    for t in tasks:
        if params.get("inputs_on_device", True):
            assert receipts[t.tensor].read_bytes == t.read_bytes, t.tensor
        a = torch.frombuffer(bytearray(gpu[t.tensor]), dtype=torch.bfloat16).double()
        b = torch.frombuffer(bytearray(cpu[t.tensor]), dtype=torch.bfloat16).double()
        assert float((a - b).abs().max()) <= 2**-7 * float(b.abs().max()), t.tensor  # bf16 rounding


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_move_rows_is_the_converted_slice(device, dtype, bf16_family):
    """Rows moved chunk by chunk (on CUDA through the pinned buffers, converting there or not)."""
    base, _ = bf16_family
    path = next(base.glob("*.safetensors"))
    reader = open_shard(str(path))
    name, entry = next((k, e) for k, e in reader.entries.items() if len(e.shape) == 2)
    whole = load_file(path)[name]
    for step in (1, 3, 1000):
        got = move_rows(reader, entry, 2, entry.shape[0] - 1, dtype, torch.device(device), step)
        assert got.device.type == device and torch.equal(got.cpu(), whole[2:-1].to(dtype))
