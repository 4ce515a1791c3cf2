"""Per-channel moments (count, mean, M2) of module outputs, their exact combination, and their file.

``Moments.merge`` is Chan, Golub & LeVeque's pairwise update, so moments taken per batch, per
worker or per pass combine exactly in any split of the rows. ``moments.safetensors`` stores, per
point, ``<point>.mean`` and ``<point>.var`` (fp64, population variance) and ``<point>.count``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge.engine.errors import StatsError
from raymerge.engine.safeio import parse_json

MOMENTS_FILE = "moments.safetensors"


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and M2 = Σ (x − mean)² of some rows (fp64, CPU).

    ``merge`` is Chan, Golub & LeVeque's pairwise update, exact for any split of the rows:
    δ = μ_b − μ_a, μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def of_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float64) -> Moments:
        """Moments of ``rows`` [n, channels], computed in ``dtype`` on the rows' device."""
        x = rows.to(dtype)
        mean = x.mean(0)
        return Moments(int(x.shape[0]), mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both row sets together."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        b = other.mean.to(self.mean.device, self.mean.dtype)
        delta = b - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device, self.m2.dtype) + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Population variance M2 / n (what BatchNorm/REPAIR normalise with)."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def cpu(self) -> Moments:
        return Moments(
            self.count, self.mean.detach().to("cpu", torch.float64), self.m2.detach().to("cpu", torch.float64)
        )


def merge_moments(parts: Sequence[Mapping[str, Moments]]) -> dict[str, Moments]:
    """Combine per-worker moments point by point (in the given order, so the result is deterministic)."""
    out: dict[str, Moments] = {}
    for part in parts:
        for name, m in part.items():
            out[name] = out[name].merge(m) if name in out else m
    return out


def write_moments(path: Path, points: Sequence[str], moments: Mapping[str, Moments]) -> None:
    """``<point>.mean`` / ``.var`` (fp64, population) / ``.count`` for each point, in a safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for p in points:
        m = moments[p]
        tensors[f"{p}.mean"] = m.mean.contiguous()
        tensors[f"{p}.var"] = m.var.contiguous()
        tensors[f"{p}.count"] = torch.tensor(m.count, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "points": json.dumps(list(points))})


def read_moments(path: str | Path) -> dict[str, Moments]:
    """The moments ``write_moments`` wrote, by point."""
    from safetensors import safe_open

    out: dict[str, Moments] = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for p in parse_json(meta.get("points", "[]"), file=str(path), expect=list, error=StatsError, what="points"):
            n = int(f.get_tensor(f"{p}.count"))
            mean = f.get_tensor(f"{p}.mean")
            out[p] = Moments(n, mean, f.get_tensor(f"{p}.var") * n)
    return out
