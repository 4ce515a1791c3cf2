"""Models for forward passes: loading through transformers/accelerate within a memory budget,
device resolution, and the module facts the passes need (inputs, devices, linear layers).

Weights up to half the budget load normally; larger models are built on the meta device and
dispatched by accelerate, with what does not fit streamed from disk layer by layer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymerge.engine.errors import StatsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for forward passes, and how it was placed."""

    model: nn.Module
    source: str | None
    dispatched: bool  # True: accelerate hooks move weights from CPU/disk on the fly
    host_weight_bytes: int  # weights resident in host memory
    device: torch.device
    offload_dir: str | None = None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise StatsError(
            "data-based merging loads models and tokenizers with the transformers package, which is not installed",
            hint="pip install 'transformers>=4.45'",
        ) from None


def model_class(model_dir: str) -> tuple[Any, Any]:
    """The transformers class named by ``config.json``'s ``architectures`` (else ``AutoModel``) and the config."""
    require_transformers()
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise StatsError(f"cannot read the model's config.json: {exc}", file=model_dir) from None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, config
    from transformers import AutoModel

    return AutoModel, config


def checkpoint_bytes(model_dir: str) -> tuple[int, dict[str, tuple[int, ...]], torch.dtype]:
    """Bytes, tensor shapes and the dominant float dtype of a checkpoint, from headers only."""
    from raymerge.engine.storage import open_checkpoint

    ck = open_checkpoint(model_dir)
    total = 0
    by_dtype: dict[torch.dtype, int] = {}
    for e in ck.entries.values():
        nb = e.end - e.start
        total += nb
        if e.is_float:
            by_dtype[e.torch_dtype] = by_dtype.get(e.torch_dtype, 0) + nb
    dtype = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else torch.float32
    return total, {k: tuple(e.shape) for k, e in ck.entries.items()}, dtype


def load_model(
    model_dir: str | Path,
    *,
    device: str | None = "auto",
    memory_budget: int | None = None,
    offload: bool | None = None,
    offload_dir: str | None = None,
) -> LoadedModel:
    """Load an HF model directory for inference, within ``memory_budget`` bytes of host memory.

    Weights up to half the budget (or all, without a budget) load normally onto ``device``.
    Larger models — or any with ``offload=True`` — are built on the meta device
    (``init_empty_weights``) and placed by ``load_checkpoint_and_dispatch``: the GPU (when used)
    takes what fits, host memory at most half the budget, the rest goes to ``offload_dir`` (a temp
    dir by default) and is streamed in layer by layer during the forward pass.
    """
    model_dir = str(model_dir)
    dev = resolve_device(device)
    cls, config = model_class(model_dir)
    weight_bytes, _, dtype = checkpoint_bytes(model_dir)
    host_share = None if memory_budget is None else max(1, memory_budget // 2)
    gpu_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
    fits = weight_bytes <= (int(gpu_free * 0.8) if dev.type == "cuda" else (host_share or weight_bytes))
    if offload is None:
        offload = not fits
    if not offload:
        kw: dict[str, Any] = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
        if dev.type != "cpu":
            kw["device_map"] = {"": str(dev)}
        with _quiet_transformers():
            model = cls.from_pretrained(model_dir, **kw).eval()
        if dev.type == "cpu":
            model.to(dev)
        return LoadedModel(model, model_dir, False, weight_bytes if dev.type == "cpu" else 0, dev)

    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    max_memory: dict[Any, Any] = {"cpu": host_share if host_share is not None else weight_bytes // 2}
    if dev.type == "cuda":
        max_memory[dev.index or 0] = int(gpu_free * 0.8)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if set(device_map.values()) == {"disk"}:
        # accelerate keeps room in memory for the largest block it streams in; below that nothing
        # can run (and accelerate 1.x fails on an all-disk map anyway).
        raise StatsError(
            f"a memory budget of {(memory_budget or 0) / 2**20:.1f} MiB leaves too little host memory to "
            "stream the model's largest block from disk",
            file=model_dir,
            hint="raise --memory-budget",
        )
    own_dir = offload_dir is None
    off = offload_dir or tempfile.mkdtemp(prefix="raymerge-offload-")
    model = load_checkpoint_and_dispatch(
        model,
        model_dir,
        device_map=device_map,
        offload_folder=off,
        no_split_module_classes=no_split,
        dtype=dtype,
    ).eval()
    resident = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.device.type == "cpu")
    log.info("model %s dispatched: %s (offload %s)", model_dir, sorted(set(map(str, device_map.values()))), off)
    return LoadedModel(model, model_dir, True, resident, dev, off if own_dir else None)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers (raymerge reports progress itself)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def release_model(loaded: LoadedModel) -> None:
    """Drop a model and remove the temporary offload folder it created."""
    if loaded.offload_dir:
        shutil.rmtree(loaded.offload_dir, ignore_errors=True)


def module_map(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → module (``named_modules``)."""
    return dict(model.named_modules())


def input_device(model: nn.Module) -> torch.device:
    """Where to put the inputs: accelerate's execution device of the first module, else the first parameter's."""
    for mod in model.modules():
        hook = getattr(mod, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def accepted_inputs(model: nn.Module) -> set[str] | None:
    """Keyword arguments the model's forward names explicitly (None: accept every key)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def input_features(mod: nn.Module) -> int | None:
    """Input width of a linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2 family,
    weight stored in × out); None for anything else."""
    if isinstance(mod, nn.Linear):
        return int(mod.in_features)
    weight = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def linear_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> dict[str, int]:
    """Linear layers (``nn.Linear`` and GPT-2's ``Conv1D``), optionally filtered by glob patterns
    → input features."""
    out = {}
    for name, mod in model.named_modules():
        width = input_features(mod)
        if width is not None and (not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)):
            out[name] = width
    return out
