"""Gram files and Gram memory planning.

``grams.safetensors`` holds one ``[in, in]`` matrix G = XᵀX / N per linear layer, keyed by module
name: what the ``regmean`` method's ``grams`` parameter reads. Its header is planned and written
before any forward pass (``GramLayout.plan``), and each matrix is written at its planned offset as
soon as its pass ends. When the accumulators of all layers would not fit the memory budget,
``plan_gram_groups`` splits the layers into groups, one pass over the data each, so at most one
group is ever resident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymerge.engine.errors import StatsError
from raymerge.engine.storage import DTYPES, TAG_OF_DTYPE

GRAMS_FILE = "grams.safetensors"


@dataclass(frozen=True)
class GramLayout:
    """A pre-planned safetensors file of ``[in, in]`` matrices: header written first, data by offset."""

    path: str
    dtype: torch.dtype
    offsets: dict[str, tuple[int, int]]  # name → absolute [start, end) in the file
    dims: dict[str, int]
    size: int

    @staticmethod
    def plan(path: str | Path, dims: Mapping[str, int], dtype: torch.dtype, metadata: Mapping[str, str]) -> GramLayout:
        """Lay out one matrix per name (sorted), write the header and size the file; no data yet."""
        item = DTYPES[TAG_OF_DTYPE[dtype]][1]
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
        rel: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in sorted(dims):
            nb = dims[name] * dims[name] * item
            header[name] = {
                "dtype": TAG_OF_DTYPE[dtype],
                "shape": [dims[name], dims[name]],
                "data_offsets": [pos, pos + nb],
            }
            rel[name] = (pos, pos + nb)
            pos += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        path = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(start + pos)
        except OSError as exc:
            raise StatsError(f"cannot create statistics file: {exc.strerror}", file=path) from None
        offsets = {k: (start + lo, start + hi) for k, (lo, hi) in rel.items()}
        return GramLayout(path, dtype, offsets, dict(dims), start + pos)

    def write(self, name: str, matrix: torch.Tensor) -> None:
        """Write ``matrix`` (any device/dtype; cast to the file's dtype) at ``name``'s offset."""
        lo, hi = self.offsets[name]
        data = matrix.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data
        if data.nbytes != hi - lo:
            raise StatsError(
                f"matrix of shape {list(matrix.shape)} does not fit its planned slot", file=self.path, tensor=name
            )
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = data.cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], lo + done)
        finally:
            os.close(fd)


def read_matrix(path: str, name: str) -> torch.Tensor:
    """One tensor of a local safetensors file (whole tensor, CPU)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def plan_gram_groups(dims: Mapping[str, int], budget: int | None, itemsize: int) -> list[tuple[str, ...]]:
    """Split layers (in order) into groups whose accumulators fit ``budget`` bytes, one pass each.

    A group needs Σ in² accumulators plus two in×in temporaries (the batch product and the shared
    q/k/v product) of its widest layer.
    """
    names = list(dims)
    if budget is None:
        return [tuple(names)] if names else []
    groups: list[tuple[str, ...]] = []
    cur: list[str] = []
    used = 0
    for n in names:
        nb = dims[n] ** 2 * itemsize
        if 3 * nb > budget:
            raise StatsError(
                f"the Gram of this layer needs {3 * nb / 2**30:.2f} GiB (with temporaries) but only "
                f"{budget / 2**30:.2f} GiB of the memory budget is left for statistics",
                tensor=n,
                hint="raise --memory-budget or leave the layer out with --gram-layers",
            )
        widest = max([dims[c] for c in cur] + [dims[n]]) ** 2 * itemsize
        if cur and used + nb + 2 * widest > budget:
            groups.append(tuple(cur))
            cur, used = [], 0
        cur.append(n)
        used += nb
    if cur:
        groups.append(tuple(cur))
    return groups
