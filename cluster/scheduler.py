"""The driver's scheduler: places work units on Ray nodes under a per-node memory budget.

Ray's own resources count CPUs and GPUs but not the declared memory of our tasks, so placement
is done here: a unit goes to a node only while the declared host bytes of the units running
there plus its own stay under the budget (``--memory-budget`` is per node), and only while the
node has a free slot. Units are pinned to that node (hard node affinity), so the accounting is
exact; a unit whose node dies is placed again elsewhere. Retrying is always safe: every task
writes the same bytes at the same fixed offset however often it runs.

CPU units run as plain Ray tasks. Accelerator units (Gram and spectral methods) go to a pool of
``AcceleratorWorker`` actors: one per GPU, or one per CPU slot on clusters without GPUs. An
actor takes a second unit while it computes the first, so it can prefetch the next inputs; that
second unit's memory counts against the budget from the moment it is sent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymerge.cluster.inprocess import DriverPool
from raymerge.cluster.nodes import NodeState, alive_nodes
from raymerge.cluster.progress import ClusterProgress
from raymerge.cluster.units import WorkUnit
from raymerge.cluster.workers import AcceleratorWorker, UnitResult, run_unit
from raymerge.engine.errors import RaymergeError, TaskError
from raymerge.engine.executor import Admission
from raymerge.engine.plan import TensorTask
from raymerge.engine.task import Receipt

log = logging.getLogger(__name__)

# Ray re-runs a unit itself when its worker process dies (up to this many times), and on these
# exceptions, which are the transient ones (network file systems, range reads): raymerge's own
# errors (bad input, disk full) are deterministic and fail the merge at once.
RAY_MAX_RETRIES = 3
RETRY_EXCEPTIONS: list[type[BaseException]] = [OSError]
# How often the driver places a unit again after Ray gave up on it (node lost, actor died).
MAX_UNIT_ATTEMPTS = 4
# An actor holds at most this many units: the one computing and the one prefetching.
ACTOR_DEPTH = 2
POLL_S = 0.5
DRIVER_POLL_S = 0.05  # while the driver runs tasks of its own, whose slots Ray units wait for
LIVENESS_EVERY_S = 2.0


@dataclass
class ActorSlot:
    """One accelerator actor: its handle, node, and the units sent to it and not yet finished."""

    handle: Any
    node: NodeState
    gpu: bool
    in_flight: int = 0
    holds_slot: bool = False


@dataclass
class Running:
    unit: WorkUnit
    node: NodeState
    attempt: int
    actor: ActorSlot | None = None
    holds_slot: bool = False
    started: float = field(default_factory=time.monotonic)


class UnitScheduler:
    """Runs ``units`` on ``nodes``; calls ``on_done(task, receipt)`` in this thread per finished task."""

    def __init__(
        self,
        nodes: Sequence[NodeState],
        *,
        budget: int,
        staging_dir: str,
        device: str,
        run_id: str,
        on_done: Callable[[TensorTask, Receipt], None],
        progress: ClusterProgress,
        originals: dict[str, TensorTask],
        device_budget: int | None = None,
        threads: int | None = None,
        driver: DriverPool | None = None,
    ) -> None:
        # Torch threads per unit, one count on every node (``RayExecutor.task_threads``); by
        # default each node's cores per slot.
        self.threads = threads
        self.nodes = {n.node_id: n for n in nodes}
        self.device_budget = device_budget
        for n in nodes:
            n.memory = Admission(budget)
        self.budget = budget
        self.staging_dir = staging_dir
        self.device = device
        self.run_id = run_id
        self.on_done = on_done
        self.progress = progress
        self.originals = originals
        self.use_gpus = device != "cpu" and any(n.gpus for n in nodes)
        self.cpu_queue: deque[tuple[WorkUnit, int]] = deque()
        self.accel_queue: deque[tuple[WorkUnit, int]] = deque()
        self.running: dict[Any, Running] = {}
        self.actors: list[ActorSlot] = []
        self.done_ids: set[str] = set()
        self.bytes_read = 0
        self.failure: BaseException | None = None
        self._last_liveness = time.monotonic()
        # Tasks the driver still runs in-process (an embedded cluster's one node): they hold a
        # slot and their declared memory there until they finish.
        self.driver = driver
        self.driver_node = nodes[0] if driver is not None and nodes else None
        self._run_unit = ray.remote(run_unit)
        self._actor_cls = ray.remote(AcceleratorWorker)

    # ---------------------------------------------------------------- public

    def run(self, units: Sequence[WorkUnit]) -> None:
        """Run every unit to completion; re-raise the first task error after running units finish."""
        for unit in units:
            (self.accel_queue if unit.accelerator else self.cpu_queue).append((unit, 1))
        if self.accel_queue and self.device == "cuda" and not self.use_gpus:
            raise RaymergeError("--device cuda, but no Ray node has a GPU", hint="use --device auto or cpu")
        self._check_placeable()
        if self.driver is not None and self.driver_node is not None:
            self.driver_node.free_slots -= len(self.driver.running)
            self.driver_node.memory.take(self.driver.running_bytes)
        try:
            while self.cpu_queue or self.accel_queue or self.running or self._driver_busy():
                self._poll_driver(0)
                if self.failure is None:
                    self._dispatch()
                    if not self.running and not self._driver_busy() and (self.cpu_queue or self.accel_queue):
                        self._check_placeable()
                        raise RaymergeError("no Ray node can take the next unit", hint="see the log for why")
                elif not self.running and not self._driver_busy():
                    break
                if not self.running:
                    self._poll_driver(POLL_S)
                    continue
                timeout = DRIVER_POLL_S if self._driver_busy() else POLL_S
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
                if ready:
                    ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
                for ref in ready:
                    self._complete(ref)
                if time.monotonic() - self._last_liveness > LIVENESS_EVERY_S:
                    self._check_liveness()
                self.progress.report()
        finally:
            for ref, run in list(self.running.items()):
                if run.actor is None:  # actor calls end with their actor, killed below
                    ray.cancel(ref, force=True)
            for actor in self.actors:
                ray.kill(actor.handle, no_restart=True)
            self.actors.clear()
        if self.failure is not None:
            raise self.failure

    def _driver_busy(self) -> bool:
        return self.driver is not None and bool(self.driver.running)

    def _poll_driver(self, timeout: float) -> None:
        """Report the driver's finished tasks and give their slot and memory back to the node."""
        if self.driver is None or self.driver_node is None:
            return
        for task in self.driver.poll(timeout):
            self.driver_node.free_slots += 1
            self.driver_node.memory.give(task.est_host_bytes)
        if self.driver.error is not None and self.failure is None:
            self.failure = self.driver.error

    # ---------------------------------------------------------------- placement

    def _alive(self) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.alive]

    def _check_placeable(self) -> None:
        alive = self._alive()
        if not alive:
            raise RaymergeError("every Ray node of this merge has died", hint="run the same command again to resume")
        for queue in (self.cpu_queue, self.accel_queue):
            for unit, _ in queue:
                pool = [n for n in alive if n.gpus] if unit.accelerator and self.use_gpus else alive
                if not pool:
                    raise RaymergeError("every Ray node with a GPU has died", hint="run again to resume")
                # An actor computes one unit at a time (its compute lock), so per actor the device
                # admission rule is: each unit alone fits the device.
                budget = self.device_budget if unit.accelerator and self.use_gpus else None
                if budget is not None and unit.est_device_bytes > budget:
                    raise RaymergeError(
                        f"unit needs {unit.est_device_bytes / 2**30:.1f} GiB of device memory, "
                        f"one GPU has {budget / 2**30:.1f} GiB",
                        tensor=unit.tasks[0].tensor,
                        hint="use GPUs with more memory, or --device cpu",
                    )
                if not any(n.sees(unit.input_files) for n in pool):
                    unseen = sorted(f for f in unit.input_files if all(f in n.missing_files for n in pool))
                    raise RaymergeError(
                        "no usable Ray node sees this input shard",
                        file=unseen[0] if unseen else None,
                        tensor=unit.tasks[0].tensor,
                        hint="put the models on storage every node mounts, or use URLs (https://, s3://)",
                    )

    def _dispatch(self) -> None:
        placed = True
        while placed:
            placed = False
            if self.cpu_queue:
                unit, attempt = self.cpu_queue[0]
                node = self._pick_node(unit)
                if node is not None:
                    self.cpu_queue.popleft()
                    self._submit_cpu(unit, attempt, node)
                    placed = True
            if self.accel_queue:
                self._ensure_actors()
                unit, attempt = self.accel_queue[0]
                actor = self._pick_actor(unit)
                if actor is not None:
                    self.accel_queue.popleft()
                    self._submit_accel(unit, attempt, actor)
                    placed = True

    def _pick_node(self, unit: WorkUnit) -> NodeState | None:
        fits = [
            n
            for n in self._alive()
            if n.free_slots > 0 and n.memory.fits(unit.est_host_bytes) and n.sees(unit.input_files)
        ]
        # Spread: the node with the most free slots, then the least declared memory in use.
        return min(fits, key=lambda n: (-n.free_slots, n.memory.in_use), default=None)

    def _pick_actor(self, unit: WorkUnit) -> ActorSlot | None:
        fits = []
        for a in self.actors:
            n = a.node
            if not n.alive or a.in_flight >= ACTOR_DEPTH or not n.sees(unit.input_files):
                continue
            if not n.memory.fits(unit.est_host_bytes):
                continue
            if a.in_flight == 0 and not a.gpu and n.free_slots == 0:
                continue  # an idle CPU actor needs a free core to start computing
            fits.append(a)
        return min(fits, key=lambda a: (a.in_flight, a.node.memory.in_use), default=None)

    def _ensure_actors(self) -> None:
        """Keep the pool full: one actor per GPU, or per CPU slot without GPUs, on each alive node."""
        for node in self._alive():
            want = node.gpus if self.use_gpus else node.slots
            have = sum(1 for a in self.actors if a.node is node)
            for _ in range(want - have):
                handle = self._actor_cls.options(
                    num_cpus=0,
                    num_gpus=1 if self.use_gpus else 0,
                    max_concurrency=ACTOR_DEPTH,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                ).remote(self.staging_dir, self.device, self.threads or node.cpus_per_slot, self.run_id)
                self.actors.append(ActorSlot(handle, node, gpu=self.use_gpus))

    def _submit_cpu(self, unit: WorkUnit, attempt: int, node: NodeState) -> None:
        ref = self._run_unit.options(
            num_cpus=node.cpus_per_slot,
            max_retries=RAY_MAX_RETRIES,
            retry_exceptions=RETRY_EXCEPTIONS,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(unit.tasks, self.staging_dir, self.device, self.threads or node.cpus_per_slot, self.run_id)
        node.free_slots -= 1
        node.memory.take(unit.est_host_bytes)
        self.running[ref] = Running(unit, node, attempt, holds_slot=True)

    def _submit_accel(self, unit: WorkUnit, attempt: int, actor: ActorSlot) -> None:
        ref = actor.handle.run.remote(unit.tasks)
        node = actor.node
        if actor.in_flight == 0 and not actor.gpu:
            node.free_slots -= 1
            actor.holds_slot = True
        actor.in_flight += 1
        node.memory.take(unit.est_host_bytes)
        self.running[ref] = Running(unit, node, attempt, actor=actor)

    def _release(self, run: Running) -> None:
        node = run.node
        node.memory.give(run.unit.est_host_bytes)
        if run.holds_slot:
            node.free_slots += 1
        actor = run.actor
        if actor is not None:
            actor.in_flight -= 1
            if actor.in_flight == 0 and actor.holds_slot:
                node.free_slots += 1
                actor.holds_slot = False

    # ---------------------------------------------------------------- completion

    def _complete(self, ref: Any) -> None:
        run = self.running.pop(ref, None)
        if run is None:
            return
        self._release(run)
        try:
            result: UnitResult = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # The task itself raised: a deterministic error. Stop placing work, let running units
            # finish (their receipts still reach the journal), then raise it.
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log.debug("unit %s failed on %s:\n%s", run.unit.id, run.node.label, exc)
            if self.failure is None:
                self.failure = cause
            return
        except ray.exceptions.RayError as exc:
            self._retry(run, exc)
            return
        tally_node = self.nodes.get(result.node_id, run.node)
        io_bytes = 0
        for task, receipt in zip(run.unit.tasks, result.receipts, strict=True):
            if task.id in self.done_ids:
                continue
            self.done_ids.add(task.id)
            self.bytes_read += receipt.read_bytes  # the workers read the inputs, not this process
            io_bytes += task.read_bytes + task.write_bytes
            self.on_done(self.originals.get(task.id, task), receipt)
        self.progress.unit_done(result.node_id, tally_node.address, result.receipts, io_bytes, run.actor is not None)

    def _retry(self, run: Running, exc: BaseException) -> None:
        """Ray gave up on a unit (worker or actor died, node lost): place it again, up to a limit."""
        self._check_liveness()
        if run.actor is not None:
            self._drop_actor(run.actor)
        self.progress.requeued(run.node.node_id, run.node.address)
        node_lost = not run.node.alive
        attempt = run.attempt if node_lost else run.attempt + 1
        if attempt > MAX_UNIT_ATTEMPTS:
            if self.failure is None:
                self.failure = TaskError(
                    f"gave up after {MAX_UNIT_ATTEMPTS} attempts: {type(exc).__name__}: {exc}",
                    tensor=run.unit.tasks[0].tensor,
                    hint="see the Ray logs of the failing worker",
                )
            return
        log.warning(
            "unit %s failed on node %s (%s); placing it again (attempt %d)",
            run.unit.id,
            run.node.label,
            type(exc).__name__,
            attempt,
        )
        (self.accel_queue if run.unit.accelerator else self.cpu_queue).appendleft((run.unit, attempt))

    def _drop_actor(self, actor: ActorSlot) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
            ray.kill(actor.handle, no_restart=True)

    def _check_liveness(self) -> None:
        """Mark nodes that left the cluster dead and place their running units elsewhere."""
        self._last_liveness = time.monotonic()
        alive = alive_nodes()
        for node in self._alive():
            if node.node_id in alive:
                continue
            node.alive = False
            log.warning("Ray node %s left the cluster; its units go to the other nodes", node.label)
            for ref, run in list(self.running.items()):
                if run.node is node:
                    del self.running[ref]
                    self._release(run)
                    if run.actor is None:
                        ray.cancel(ref, force=True)
                    self.progress.requeued(node.node_id, node.address)
                    (self.accel_queue if run.unit.accelerator else self.cpu_queue).appendleft((run.unit, run.attempt))
            for actor in [a for a in self.actors if a.node is node]:
                self._drop_actor(actor)
