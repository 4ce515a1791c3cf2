"""Numerical precision policy shared by every dense-linear-algebra method (Gram and spectral).

One meaning of ``precision: auto`` and ``tf32`` for all of them, so a recipe behaves the same
whichever method it names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# GPUs with full-rate FP64 (A100 sm80, H100/H200 sm90, B200 sm100); elsewhere FP64 is 1/32–1/64 rate.
_FAST_FP64 = {(8, 0), (9, 0), (10, 0)}


def stats_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Statistics/solve dtype: ``auto`` is fp64 on CPU and on GPUs with fast FP64, else fp32.

    S = Σ Δ_tᵀΔ_t is routinely ill-conditioned (task vectors are nearly low-rank), and its pseudo-
    inverse amplifies rounding in S by the condition number: accumulating in fp32 gives relative
    errors of 1e-4 to 1e-1 against an fp64 evaluation on ordinary inputs, fp64 about 1e-8.
    """
    if precision == "fp64":
        return torch.float64
    if precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        return torch.float64
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in _FAST_FP64:
        return torch.float64
    return torch.float32


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set CUDA TF32 matmul use for the duration of a solve, then restore it."""
    prev_mm = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_mm
        torch.backends.cudnn.allow_tf32 = prev_cudnn


_READY: set[torch.device] = set()
_READY_LOCK = threading.Lock()


def prepare_device(device: torch.device) -> None:
    """Initialise torch's CUDA linear-algebra back-ends once per process, before threads race for them.

    torch loads cuSOLVER/MAGMA lazily on the first ``torch.linalg`` call; when several executor
    threads make that first call at once, all but one fail with "lazy wrapper should be called at
    most once" (seen on an H100 with ACTMat under the local executor). One tiny eigh, Cholesky and
    SVD under a lock settles it; later calls are a set lookup.
    """
    if device.type != "cuda" or device in _READY:
        return
    with _READY_LOCK:
        if device in _READY:
            return
        eye = torch.eye(2, device=device, dtype=torch.float64)
        torch.linalg.eigh(eye)
        torch.linalg.cholesky_ex(eye)
        torch.linalg.svd(eye.float())
        torch.cuda.synchronize(device)
        _READY.add(device)
