"""Progress of a Ray merge in the driver: totals, rates, ETA, and a per-node summary table.

The caller's ``on_done`` already drives the interactive progress bar; this adds what a cluster
run needs on top: periodic one-line reports when stderr is not a terminal (job logs, files),
and a final table of what each node did.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from raymerge.engine.task import Receipt

GB = 1e9
# The node id under which the driver's own tasks are counted (cluster/inprocess.py).
DRIVER_ROW = "in-proc"


@dataclass
class NodeTally:
    """What one node did: units (and how many of them on accelerator actors) and tasks finished,
    bytes read and written, seconds inside tasks, units placed again after a failure."""

    address: str
    units: int = 0
    actor_units: int = 0
    tasks: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    busy_s: float = 0.0
    requeued: int = 0


@dataclass
class ClusterProgress:
    """Counters of one run; ``report`` prints a line at most every ``every_s`` seconds."""

    total_tasks: int
    total_bytes: int  # bytes to read + bytes to write, as the progress bar counts them
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    every_s: float = 10.0
    tasks_done: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    io_done: int = 0
    nodes: dict[str, NodeTally] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    def node(self, node_id: str, address: str) -> NodeTally:
        if node_id not in self.nodes:
            self.nodes[node_id] = NodeTally(address)
        return self.nodes[node_id]

    def unit_done(
        self, node_id: str, address: str, receipts: Sequence[Receipt], io_bytes: int, on_actor: bool = False
    ) -> None:
        tally = self.node(node_id, address)
        tally.units += 1
        tally.actor_units += int(on_actor)
        tally.tasks += len(receipts)
        for r in receipts:
            tally.read_bytes += r.read_bytes
            tally.write_bytes += r.nbytes
            tally.busy_s += r.seconds
            self.read_bytes += r.read_bytes
            self.write_bytes += r.nbytes
        self.tasks_done += len(receipts)
        self.io_done += io_bytes

    def requeued(self, node_id: str, address: str) -> None:
        self.node(node_id, address).requeued += 1

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        rate = self.io_done / elapsed
        left = self.total_bytes - self.io_done
        eta = f"{left / rate:.0f} s" if rate > 0 and left > 0 else ("0 s" if left <= 0 else "?")
        return (
            f"raymerge: {self.tasks_done}/{self.total_tasks} tasks, read {self.read_bytes / GB:.2f} GB, "
            f"wrote {self.write_bytes / GB:.2f} GB, {self.read_bytes / GB / elapsed:.2f} GB/s read, ETA {eta}"
        )

    def report(self, force: bool = False) -> None:
        """Print a progress line when stderr is not a terminal (a terminal has the progress bar)."""
        now = time.monotonic()
        if self.stream.isatty() or (not force and now - self._last < self.every_s):
            return
        self._last = now
        print(self.line(), file=self.stream, flush=True)

    def table(self, note: str = "") -> str:
        """Per-node summary: units (on actors), tasks, GB read/written, busy seconds, requeued units;
        ``note`` is added in parentheses to the first line."""
        elapsed = time.monotonic() - self.t0
        rows = [("node", "units", "on actors", "tasks", "read GB", "written GB", "busy s", "requeued")]
        for node_id, t in sorted(self.nodes.items(), key=lambda kv: (kv[1].address, kv[0])):
            rows.append(
                (
                    f"{t.address} {node_id[:8]}",
                    str(t.units),
                    str(t.actor_units),
                    str(t.tasks),
                    f"{t.read_bytes / GB:.3f}",
                    f"{t.write_bytes / GB:.3f}",
                    f"{t.busy_s:.1f}",
                    str(t.requeued),
                )
            )
        tallies = self.nodes.values()
        rows.append(
            (
                "total",
                str(sum(t.units for t in tallies)),
                str(sum(t.actor_units for t in tallies)),
                str(self.tasks_done),
                f"{self.read_bytes / GB:.3f}",
                f"{self.write_bytes / GB:.3f}",
                f"{sum(t.busy_s for t in tallies):.1f}",
                str(sum(t.requeued for t in tallies)),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        ray_nodes = sum(1 for node_id in self.nodes if node_id != DRIVER_ROW)
        where = f"on {ray_nodes} node(s)"
        if DRIVER_ROW in self.nodes:
            where = f"{where} and in the driver" if ray_nodes else "in the driver"
        lines = [f"raymerge: Ray run finished in {elapsed:.1f} s {where}" + (f" ({note})" if note else "")]
        for r in rows:
            lines.append(
                "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            )
        return "\n".join(lines)
