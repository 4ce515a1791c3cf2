"""Re-indexed vocabulary rows of one task input, gathered by byte range (``tokenizer_source``).

A task over output rows [r0, r1) of an embedding or LM head reads, for each input, the rows the
plan's row map names (runs of consecutive rows in one read each), the default rows of tokens the
input lacks (means of other models' rows) and, for padding rows past the token rows, the mean of
the input's re-indexed token rows (read in chunks). Nothing but these rows is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raymerge.engine.plan.types import TensorTask
from raymerge.engine.storage import ShardReader, open_shard, row_span


class VocabGather:
    """Input rows of a re-indexed vocabulary task, in the compute dtype on the CPU."""

    def __init__(self, task: TensorTask, readers: Sequence[ShardReader], compute: torch.dtype) -> None:
        self.task = task
        self.readers = readers
        self.compute = compute
        self.lo = 0 if task.row_end > task.vocab_size else task.row_start  # first row the maps cover
        self.defaults: dict[int, torch.Tensor] = {}
        self.means: dict[int, torch.Tensor] = {}
        self.bytes_read = 0

    def rows(self, i: int, r0: int, r1: int) -> torch.Tensor:
        """Output rows [r0, r1) of input ``i``, re-indexed."""
        v = self.task.vocab_size
        cols = self.task.inputs[i].shape[1:]
        out = torch.empty((r1 - r0, *cols), dtype=self.compute)
        b = min(r1, v)
        if b > r0:
            self._fill(i, out[: b - r0], self.task.vocab_rows[i][r0 - self.lo : b - self.lo])
        if r1 > max(r0, v):
            out[max(r0, v) - r0 :] = self._mean(i)
        return out

    def _fill(self, i: int, dst: torch.Tensor, idx: Sequence[int]) -> None:
        """``dst[k]`` = row ``idx[k]`` of input ``i`` (a default row where negative)."""
        reader, entry = self.readers[i], self.task.inputs[i].entry(self.task.tensor)
        k, n = 0, len(idx)
        while k < n:
            if idx[k] < 0:
                dst[k] = self._default(-idx[k] - 1)
                k += 1
                continue
            j = k
            while j + 1 < n and idx[j + 1] == idx[j] + 1:
                j += 1
            a, b = idx[k], idx[j] + 1
            dst[k : j + 1] = reader.read_rows(entry, a, b)
            self.bytes_read += (b - a) * entry.row_bytes()
            reader.release(*row_span(entry, a, b))
            k = j + 1

    def _default(self, k: int) -> torch.Tensor:
        """Default row ``k``: the sum of its rows in listed order, over their count (mergekit's order)."""
        if k not in self.defaults:
            cols = self.task.inputs[0].shape[1:]
            acc = torch.zeros(cols, dtype=self.compute)
            rows = self.task.vocab_defaults[k]
            for m, r in rows:
                ref = self.task.vocab_refs[m]
                entry = ref.entry(self.task.tensor)
                acc = acc + open_shard(ref.url).read_rows(entry, r, r + 1)[0].to(self.compute)
                self.bytes_read += entry.row_bytes()
            self.defaults[k] = acc / len(rows) if rows else acc
        return self.defaults[k]

    def _mean(self, i: int) -> torch.Tensor:
        """The mean of input ``i``'s re-indexed token rows (the value of its padding rows)."""
        if i not in self.means:
            v, step = self.task.vocab_size, max(1, self.task.chunk_rows)
            total = torch.zeros(self.task.inputs[i].shape[1:], dtype=torch.float64)
            for a in range(0, v, step):
                b = min(v, a + step)
                chunk = torch.empty((b - a, *total.shape), dtype=self.compute)
                self._fill(i, chunk, self.task.vocab_rows[i][a:b])
                total += chunk.double().sum(dim=0)
            self.means[i] = (total / v).to(self.compute)
        return self.means[i]


__all__ = ["VocabGather"]
