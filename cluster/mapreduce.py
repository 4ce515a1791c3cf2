"""Which tasks run as a map-reduce over experts on a Ray cluster, and where each expert is read.

A task every input of which some node sees runs whole, as always. A task that no node can run
whole (each node mounts only some of the experts' shards) is cut when its method's statistics
are sums over experts (``engine.reduce``): experts are grouped by nodes that see them together
with the base — as few groups as the nodes allow, each group's experts in order — and each group
becomes a map task that only those nodes can run; the reduce reads the base and the partial
files (on the shared staging storage) and solves, on the accelerator pool where there is one.
``map_reduce="always"`` cuts every reducible task whatever the nodes see (to spread the reading
of experts over nodes, or to test the path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from raymerge.cluster.nodes import NodeState
from raymerge.cluster.units import local_files
from raymerge.engine.errors import RaymergeError
from raymerge.engine.plan import TensorTask
from raymerge.engine.reduce import plan_map_reduce, reducible
from raymerge.engine.storage import is_local, local_path

MODES = ("auto", "always")


@dataclass
class MapReducePlan:
    """The tasks of a run in two phases: first the tasks that run ``whole`` and the maps (by node
    group: a group's maps read the same models, so they share work units), then the ``reduces``."""

    whole: list[TensorTask] = field(default_factory=list)
    maps_by_group: dict[tuple[str, ...], list[TensorTask]] = field(default_factory=dict)
    reduces: list[TensorTask] = field(default_factory=list)

    @property
    def cut(self) -> int:
        return len(self.reduces)


def expert_groups(task: TensorTask, nodes: Sequence[NodeState]) -> list[tuple[tuple[str, ...], list[int]]]:
    """Experts of ``task`` grouped by the nodes that can read each with the base: greedily the node
    set covering most of the experts left, so there are as few partial files as the mounts allow.
    Each group is (the ids of the nodes that may run it, its expert indices in order)."""
    base = local_files(task.inputs[:1])
    experts = task.inputs[1:]
    readers: list[frozenset[str]] = []
    for i, ref in enumerate(experts):
        ok = frozenset(n.node_id for n in nodes if n.sees(base | local_files([ref])))
        if not ok:
            raise RaymergeError(
                f"no usable Ray node reads expert {i + 1} together with the base model",
                file=local_path(ref.url) if is_local(ref.url) else ref.url,
                tensor=task.tensor,
                hint="every expert must be readable, with the base, by some node (or use URLs)",
            )
        readers.append(ok)
    left = set(range(len(experts)))
    groups: list[tuple[tuple[str, ...], list[int]]] = []
    while left:
        # The node covering the most remaining experts (ties: the first node in address order).
        best = max(nodes, key=lambda n: sum(1 for i in left if n.node_id in readers[i]))
        members = sorted(i for i in left if best.node_id in readers[i])
        can_run = frozenset.intersection(*(readers[i] for i in members))
        groups.append((tuple(sorted(can_run)), members))
        left -= set(members)
    groups.sort(key=lambda g: g[1][0])
    return groups


def split_for_nodes(
    tasks: Sequence[TensorTask], nodes: Sequence[NodeState], staging_dir: str, mode: str = "auto"
) -> MapReducePlan:
    """The run's tasks with those no node can run whole (all reducible ones with ``always``) cut
    into maps and reduces; a task that needs cutting but cannot be cut is left whole (the
    scheduler then names the input no node sees)."""
    if mode not in MODES:
        raise ValueError(f"map_reduce must be one of {MODES}, got {mode!r}")
    out = MapReducePlan()
    for task in tasks:
        whole = any(n.sees(local_files(task.inputs)) for n in nodes)
        if not reducible(task) or (whole and mode == "auto"):
            out.whole.append(task)
            continue
        groups = expert_groups(task, nodes)
        maps, reduce = plan_map_reduce(task, [g for _, g in groups], staging_dir)
        for (node_ids, _), m in zip(groups, maps, strict=True):
            out.maps_by_group.setdefault(node_ids, []).append(m)
        out.reduces.append(reduce)
    return out


__all__ = ["MODES", "MapReducePlan", "expert_groups", "split_for_nodes"]
