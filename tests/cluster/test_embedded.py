"""The embedded Ray of ``--executor ray`` without ``--address``: started once, in a helper process,
while the driver runs tasks itself; then the driver hands the rest to Ray.

These tests steer when the cluster counts as ready (never by the clock) and check what must hold
whatever the timing: every task is run and journalled exactly once, the output is the local
executor's byte for byte, the driver's in-flight tasks and Ray's units share the node's slots,
and no process or session directory of the embedded cluster outlives the merge, even when the
driver is SIGKILLed.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from raymerge.cluster import executor as executor_mod
from raymerge.cluster import head as head_script
from raymerge.cluster import inprocess
from raymerge.cluster.connect import EmbeddedHead
from raymerge.cluster.executor import RayExecutor
from raymerge.engine import writer
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.synth import LlamaShape, make_family

from conftest import recipe_text

SHARD = 150_000


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    shape = LlamaShape(vocab=512, hidden=64, layers=6, intermediate=176, heads=4, kv_heads=2)
    return make_family(tmp_path_factory.mktemp("embfam"), shape, 3, dtype=torch.float32, shard_bytes=300_000)


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def ties(family: tuple[Path, list[Path]]) -> str:
    base, experts = family
    return recipe_text("ties", base, list(experts), {"density": 0.4}, [{"weight": 1.0}] * 3)


def head_procs(temp_dir: str) -> list[psutil.Process]:
    """Live processes of the embedded cluster whose session lives under ``temp_dir``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(temp_dir in a for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


class Recorder:
    """Counts heads started, tasks run by the driver, and receipts journalled per task."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, driver_tasks_before_ready: int) -> None:
        self.heads: list[EmbeddedHead] = []
        self.driver_ran: list[str] = []
        self.journal: collections.Counter[str] = collections.Counter()
        self.head_pids: set[int] = set()
        start, ready, record = EmbeddedHead.start, RayExecutor._cluster_ready, writer.Staging.record
        run_task = inprocess.run_task

        def counting_start(num_cpus: int) -> EmbeddedHead:
            head = start(num_cpus)
            self.heads.append(head)
            return head

        def held_ready(executor: RayExecutor) -> bool:
            # Not ready until the driver has finished some tasks; then wait here (the driver takes
            # no task meanwhile) until the cluster really is, and note its processes.
            if len(self.driver_ran) < driver_tasks_before_ready:
                return False
            while not ready(executor):
                time.sleep(0.05)
            helper = psutil.Process(self.heads[0].proc.pid)
            self.head_pids |= {helper.pid, *(k.pid for k in helper.children(recursive=True))}
            return True

        def counting_run(task, staging_dir, device):  # type: ignore[no-untyped-def]
            receipt = run_task(task, staging_dir, device)
            self.driver_ran.append(task.id)
            return receipt

        def counting_record(staging, receipt):  # type: ignore[no-untyped-def]
            self.journal[receipt.id] += 1
            return record(staging, receipt)

        monkeypatch.setattr(EmbeddedHead, "start", staticmethod(counting_start))
        monkeypatch.setattr(RayExecutor, "_cluster_ready", held_ready)
        monkeypatch.setattr(inprocess, "run_task", counting_run)
        monkeypatch.setattr(writer.Staging, "record", counting_record)


def test_driver_runs_tasks_until_ready_then_ray_the_rest(family, tmp_path, monkeypatch, capfd):
    import ray

    text = ties(family)
    merge(parse_recipe(text), tmp_path / "local", progress=False, workers=2, out_shard_bytes=SHARD)
    rec = Recorder(monkeypatch, driver_tasks_before_ready=4)
    executor = RayExecutor(workers=2, eager=True)
    executor.handoff_min_s = 0  # this tiny merge is worth handing over
    figures = merge(parse_recipe(text), tmp_path / "ray", executor=executor, progress=False, out_shard_bytes=SHARD)

    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    assert len(rec.heads) == 1, "the embedded cluster is started once per merge"
    # Every task journalled exactly once, whichever side ran it.
    assert set(rec.journal.values()) == {1} and len(rec.journal) == figures.tasks
    # The driver ran at least the tasks it had to before the cluster was ready, and Ray the rest.
    assert 4 <= len(rec.driver_ran) < figures.tasks
    err = capfd.readouterr().err
    assert re.search(r"Ray run finished in [0-9.]+ s on 1 node\(s\) and in the driver \(embedded Ray ready after", err)
    table = err.split("Ray run finished", 1)[1].splitlines()
    rows = {" ".join(r.split()[:2]): r.split()[2:] for r in table[2:] if r.strip() and "total" not in r}
    total = next(r.split()[1:] for r in table if r.split()[:1] == ["total"])
    driver_row = rows.pop("driver in-proc")
    (node_row,) = rows.values()
    assert int(driver_row[2]) == len(rec.driver_ran)
    assert int(driver_row[2]) + int(node_row[2]) == int(total[2]) == figures.tasks
    # Stopped: no process of the cluster, no session directory, and this process is disconnected.
    head = rec.heads[0]
    assert rec.head_pids and not [p for p in rec.head_pids if psutil.pid_exists(p) and not _zombie(p)]
    assert not head_procs(head.temp_dir) and not os.path.exists(head.temp_dir)
    assert not ray.is_initialized()


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_whole_merge_in_the_driver_when_the_cluster_is_never_ready(family, tmp_path, monkeypatch):
    text = ties(family)
    merge(parse_recipe(text), tmp_path / "local", progress=False, workers=2, out_shard_bytes=SHARD)
    rec = Recorder(monkeypatch, driver_tasks_before_ready=10**9)
    connected = []
    monkeypatch.setattr(executor_mod.RayExecutor, "_connect", lambda self: connected.append(1))
    figures = merge(
        parse_recipe(text),
        tmp_path / "ray",
        executor=RayExecutor(workers=2, eager=True),
        progress=False,
        out_shard_bytes=SHARD,
    )
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    assert len(rec.driver_ran) == figures.tasks and set(rec.journal.values()) == {1}
    assert not connected, "the driver never joined a cluster it did not need"
    head = rec.heads[0]
    assert not head_procs(head.temp_dir) and not os.path.exists(head.temp_dir)


def test_a_failing_driver_task_is_one_error_and_the_cluster_is_stopped(family, tmp_path, monkeypatch):
    from raymerge.engine.errors import TaskError

    rec = Recorder(monkeypatch, driver_tasks_before_ready=10**9)
    real = inprocess.run_task
    calls = []

    def third_fails(task, staging_dir, device):  # type: ignore[no-untyped-def]
        calls.append(task.id)
        if len(calls) == 3:
            raise TaskError("injected", tensor=task.tensor)
        return real(task, staging_dir, device)

    monkeypatch.setattr(inprocess, "run_task", third_fails)
    with pytest.raises(TaskError, match="injected"):
        merge(
            parse_recipe(ties(family)),
            tmp_path / "ray",
            executor=RayExecutor(workers=2, eager=True),
            progress=False,
            out_shard_bytes=SHARD,
        )
    # The tasks that finished are journalled once (a resume keeps them); nothing was published.
    assert set(rec.journal.values()) == {1} and len(rec.journal) < 3 + 2
    assert not (tmp_path / "ray").exists()
    head = rec.heads[0]
    assert not head_procs(head.temp_dir) and not os.path.exists(head.temp_dir)


def _nice(p: psutil.Process, gone: int) -> int:
    try:
        return int(p.nice())
    except psutil.Error:
        return gone


HOLDER = """
import sys, time
from raymerge.cluster.connect import EmbeddedHead
head = EmbeddedHead.start(1)
head.gcs_address()
print(head.temp_dir, head.proc.pid, flush=True)
time.sleep(600)
"""


def test_embedded_cluster_goes_when_the_driver_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        temp_dir, pid = proc.stdout.readline().split()
        assert head_procs(temp_dir), "the embedded cluster runs"
        helper = psutil.Process(int(pid))
        cluster = [helper, *helper.children(recursive=True)]
        assert len(cluster) >= 3  # the helper, GCS, raylet, ...
        # The cluster runs as background work, below the driver's priority (nice 0 here).
        assert os.nice(0) == 0
        assert min(_nice(p, head_script.HEAD_NICENESS) for p in cluster) == head_script.HEAD_NICENESS
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (head_procs(temp_dir) or os.path.exists(temp_dir)):
        time.sleep(0.2)
    assert not head_procs(temp_dir) and not os.path.exists(temp_dir)
    assert not [p for p in cluster if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


class ReadyHead:
    """Stands in for an embedded head that is up."""

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def test_hand_over_only_work_that_outlasts_the_hand_over(monkeypatch):
    from raymerge.cluster.progress import DRIVER_ROW, ClusterProgress

    monkeypatch.setattr(EmbeddedHead, "start", staticmethod(lambda num_cpus: ReadyHead()))
    ex = RayExecutor(workers=2)
    joined = []

    class Joined(Exception):
        pass

    def connect():  # type: ignore[no-untyped-def]
        joined.append(1)
        raise Joined

    monkeypatch.setattr(ex, "_connect", connect)
    ex._progress = ClusterProgress(10, 1000)
    assert not ex._cluster_ready() and not joined, "no task done yet: no rate to judge by"
    driver = ex._progress.node(DRIVER_ROW, "driver")
    ex._progress.io_done, driver.busy_s = 500, 2.0  # 2 slots x 250 bytes per task-second: 1 s left
    assert not ex._cluster_ready() and not joined, "1 s of the driver's work left: keep it"
    assert ex._head is None, "nor start a cluster for it"
    assert "not used" in ex._startup_note()
    driver.busy_s = 64.0  # 32 s left: past the hand-over's 30 s, not past it and the start-up's 5
    assert not ex._cluster_ready() and not joined and ex._head is None
    driver.busy_s = 200.0  # 2 slots x 2.5 bytes per task-second: 100 s left
    with pytest.raises(Joined):
        ex._cluster_ready()
    assert joined and ex.head_ready_s is not None


def test_a_merge_the_driver_finishes_alone_starts_no_cluster(family, tmp_path, monkeypatch):
    """With the default thresholds a merge of seconds never starts the embedded cluster: the
    driver runs it all, at the local executor's cost, and the output is the local one."""
    import ray

    text = ties(family)
    merge(parse_recipe(text), tmp_path / "local", progress=False, workers=2, out_shard_bytes=SHARD)
    started = []
    monkeypatch.setattr(EmbeddedHead, "start", staticmethod(lambda num_cpus: started.append(num_cpus)))
    executor = RayExecutor(workers=2)
    merge(parse_recipe(text), tmp_path / "ray", executor=executor, progress=False, out_shard_bytes=SHARD)
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    assert not started and not ray.is_initialized()
    assert "not used" in executor._startup_note()
