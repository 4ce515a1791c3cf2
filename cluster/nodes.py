"""The Ray nodes a merge may use, and what each can see of the file system.

Every node that runs tasks must see the staging directory (tasks ``pwrite`` into its shards) and
the local input shards of the tasks it gets. A probe task pinned to each node checks both before
any work is placed, so a node without the shared mount is left out instead of writing into a
stray local copy or failing half-way through a merge.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymerge.engine.errors import RaymergeError
from raymerge.engine.executor import Admission

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0


@dataclass
class NodeState:
    """One Ray node as the scheduler sees it: capacity, and what is running there now.

    ``slots`` is how many units compute at once (``cpus_per_slot`` cores each); ``memory`` counts
    the declared host bytes of units placed there and not yet finished against the per-node
    budget (the scheduler sets it), by the executors' one admission rule.
    """

    node_id: str
    address: str
    cpus: int
    gpus: int
    slots: int
    cpus_per_slot: int
    free_slots: int = 0
    memory: Admission = field(default_factory=lambda: Admission(0))
    alive: bool = True
    missing_files: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.free_slots = self.slots

    @property
    def label(self) -> str:
        return f"{self.address} {self.node_id[:8]}"

    @property
    def in_use(self) -> int:
        return self.memory.in_use

    def sees(self, files: Iterable[str]) -> bool:
        return not any(f in self.missing_files for f in files)


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def probe(plan_file: str, files: list[str]) -> tuple[str | None, list[str]]:
    """On a node: the digest of the staging plan file and which of ``files`` are missing."""
    return file_digest(plan_file), [f for f in files if not os.path.exists(f)]


def alive_nodes() -> dict[str, dict[str, Any]]:
    """Alive Ray nodes with at least one CPU, by node id."""
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1}


def discover_nodes(staging_dir: str, input_files: Iterable[str], workers: int, budget: int) -> list[NodeState]:
    """Probe every alive node; return those that see this merge's staging directory.

    ``workers`` caps concurrent units per node (as ``--workers`` does for the local executor);
    each unit gets an equal share of the node's cores for its torch threads. A node whose Ray
    ``memory`` resource (what Ray thinks tasks may use there) is below ``budget`` bytes is used,
    with a warning: the budget is per node, and such a node can run out of memory.
    """
    plan_file = os.path.join(staging_dir, ".raymerge", "plan.json")
    want = file_digest(plan_file)
    files = sorted(set(input_files))
    nodes = alive_nodes()
    remote_probe = ray.remote(probe)
    refs = {
        remote_probe.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), max_retries=1
        ).remote(plan_file, files): node_id
        for node_id in nodes
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    for ref in pending:
        log.warning("Ray node %s did not answer the probe in %.0f s; not using it", refs[ref], PROBE_TIMEOUT_S)
        ray.cancel(ref, force=True)
    states: list[NodeState] = []
    for ref in ready:
        node_id = refs[ref]
        info = nodes[node_id]
        try:
            digest, missing = ray.get(ref)
        except ray.exceptions.RayError as exc:
            log.warning("Ray node %s failed the probe (%s); not using it", node_id, exc)
            continue
        if digest != want:
            log.warning(
                "Ray node %s (%s) does not see staging directory %s; not using it (put the output on a "
                "file system every node mounts)",
                info["NodeManagerAddress"],
                node_id[:8],
                staging_dir,
            )
            continue
        res = info["Resources"]
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        if 0 < res.get("memory", 0) < budget:
            log.warning(
                "Ray node %s (%s) has %.1f GiB for tasks but --memory-budget is %.1f GiB per node; lower the budget",
                info["NodeManagerAddress"],
                node_id[:8],
                res["memory"] / 2**30,
                budget / 2**30,
            )
        slots = max(1, min(workers, cpus))
        states.append(
            NodeState(
                node_id=node_id,
                address=info["NodeManagerAddress"],
                cpus=cpus,
                gpus=gpus,
                slots=slots,
                cpus_per_slot=max(1, cpus // slots),
                missing_files=frozenset(missing),
            )
        )
    if not states:
        raise RaymergeError(
            "no Ray node can see the staging directory",
            file=staging_dir,
            hint="the output must be on a file system every node mounts (or use --executor local)",
        )
    states.sort(key=lambda s: (s.address, s.node_id))
    return states
