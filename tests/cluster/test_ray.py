"""Ray execution: same bytes as the local executor, on an embedded Ray and on a real multi-node
cluster started on this machine (127.0.0.1), through worker, node and driver failures, and
through Ray's Jobs API (``raymerge submit``).

The cluster is one head (dashboard on 127.0.0.1, for the Jobs API) and two worker nodes with one
CPU each, shared by every test of this module. Each node runs in its own process session, so a
test can "stop a node" by killing its session and teardown removes exactly this cluster's
processes (``ray stop --force`` would also kill every other Ray instance on the machine).
Failures are injected from outside only; tasks are slowed for the fault tests through Ray's
own ``RAY_RUNTIME_ENV_HOOK`` and a worker setup hook written below, not through raymerge code.
Faults: a SIGKILLed worker, accelerator actor, raylet and driver, a node stopped mid-merge, and
a node whose tiny object store is held over-full (spilling) by another driver during a merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from raymerge.cluster import RayExecutor
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.synth import LlamaShape, make_family

from conftest import load_dir, map_reduce_errors, recipe_text

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RAYMERGE = str(BIN / "raymerge")

CASES: dict[str, tuple[str, bool, dict | None, list[dict] | None, str]] = {
    "linear": ("linear", False, None, [{"weight": 0.5}, {"weight": 0.3}, {"weight": "[0.2, 1.0]"}], ""),
    "task_arithmetic": (
        "task_arithmetic",
        True,
        {"lambda": 0.8},
        [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}],
        "",
    ),
    "ties": ("ties", True, {"density": 0.4}, [{"weight": 1.0}] * 3, "out_dtype: bfloat16"),
    "dare_ties": ("dare_ties", True, {"density": 0.5}, [{"weight": 1.0}] * 3, "raymerge:\n  seed: 3"),
    "model_stock": ("model_stock", True, None, None, ""),
    "slerp": ("slerp", True, {"t": "[0.1, 0.9]"}, None, ""),
}


def case_recipe(case: str, family: tuple[Path, list[Path]]) -> str:
    method, use_base, params, per_model, extra = CASES[case]
    base, experts = family
    models: list = list(experts)
    if method == "linear":
        models = [base, *experts[:2]]
    if method == "slerp":
        models = [base, experts[0]]
    return recipe_text(method, base if use_base else None, models, params, per_model, extra=extra)


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of every safetensors shard of a model directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def local_reference(text: str, out: Path) -> dict[str, str]:
    # workers=2 on this 2-core machine gives one torch thread per task, as on the 1-CPU Ray nodes.
    merge(parse_recipe(text), out, progress=False, workers=2, out_shard_bytes=150_000)
    return digests(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def raylets(sid: int) -> list[psutil.Process]:
    found = []
    for p in session_procs(sid):
        with contextlib.suppress(psutil.Error):
            if p.name() == "raylet":
                found.append(p)
    return found


def kill_session(sid: int) -> None:
    for p in session_procs(sid):
        with contextlib.suppress(psutil.Error):
            p.kill()


def ray_task_procs(title: str, sids: set[int] | None = None) -> list[psutil.Process]:
    """Ray worker processes currently executing ``title`` (Ray sets the process title to ray::NAME)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].startswith(f"ray::{title}") and (sids is None or os.getsid(p.pid) in sids):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


SLOW_HOOK = '''
"""Slows every tensor task of the job that loads it (test harness; see tests/cluster/test_ray.py)."""
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def runtime_env_hook(runtime_env):
    """RAY_RUNTIME_ENV_HOOK: give the job's workers the setup hook below."""
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars["PYTHONPATH"] = HERE
    env_vars["RAYMERGE_TEST_TASK_DELAY"] = os.environ.get("RAYMERGE_TEST_TASK_DELAY", "0.15")
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = "raymerge_slow_hook.slow_tasks"
    return env


def slow_tasks():
    import raymerge.engine.task as task

    delay = float(os.environ["RAYMERGE_TEST_TASK_DELAY"])
    real = task.run_task

    def slow(t, staging_dir, device="cpu"):
        time.sleep(delay / 2)
        receipt = real(t, staging_dir, device)
        time.sleep(delay / 2)
        return receipt

    task.run_task = slow
'''


@dataclass
class RayTestCluster:
    """A head and worker nodes on 127.0.0.1, each ``ray start`` in its own process session."""

    root: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    sessions: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # Per node, directories it must not see: the node runs in its own user and mount namespaces
    # with an empty tmpfs mounted over each (see ``can_hide_paths``).
    hidden: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - kept for the process's lifetime
        cmd = [
            RAY,
            "start",
            "--num-cpus=1",
            f"--resources={json.dumps({name: 1})}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            *args,
        ]
        if self.hidden.get(name):
            mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(d))}" for d in self.hidden[name])
            cmd = ["unshare", "-rm", "sh", "-c", f"{mounts} && exec {shlex.join(cmd)}"]
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.sessions[name] = proc.pid  # a session leader's sid is its pid
        return proc

    def start_head(self) -> None:
        proc = self._start(
            "rm_head",
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.root / 'ray'}",
            ],
        )
        assert proc.wait(timeout=120) == 0, (self.root / "rm_head.log").read_text()[-3000:]

    def add_workers(self, *names: str, args: tuple[str, ...] = ()) -> None:
        for n in names:  # one at a time: nodes started together can race for the same free port
            p = self._start(n, [f"--address={self.address}", *args])
            assert p.wait(timeout=120) == 0, (self.root / f"{n}.log").read_text()[-3000:]
        wait_for(lambda: set(names) <= self.node_names(), 60, f"nodes {names} to register")

    def ensure_worker(self, name: str, args: tuple[str, ...] = ()) -> int:
        """Start worker node ``name`` unless it is already up (tests may share it); its session id."""
        sid = self.sessions.get(name)
        if sid is None or not raylets(sid):
            self.add_workers(name, args=args)
        return self.sessions[name]

    def node_names(self) -> set[str]:
        out = subprocess.run(
            [RAY, "list", "nodes", f"--address={self.address}", "--format=json", "--detail", "--filter=state=ALIVE"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            return set()
        names = set()
        for node in json.loads(out.stdout or "[]"):
            names |= {k for k in (node.get("resources_total") or {}) if k.startswith("rm_")}
        return names

    def kill_node(self, name: str) -> None:
        """Stop a node the hard way: every process of its session dies at once (a lost machine)."""
        kill_session(self.sessions[name])

    def stop(self) -> None:
        for sid in self.sessions.values():
            kill_session(sid)
        wait_for(lambda: not any(session_procs(s) for s in self.sessions.values()), 30, "cluster processes to exit")


@pytest.fixture(scope="module")
def cluster(request) -> Iterator[RayTestCluster]:
    root = Path(tempfile.mkdtemp(prefix="rmray-", dir="/tmp"))  # short: Ray's socket paths must fit
    failed_before = request.session.testsfailed
    (root / "raymerge_slow_hook.py").write_text(textwrap.dedent(SLOW_HOOK))
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # jobs run `raymerge` from the head's PATH
        RAY_USAGE_STATS_ENABLED="0",
        # A token of this cluster's own for every node, driver and client. Drivers run as
        # subprocesses: Ray caches the auth mode and token per process at import.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        # Notice a lost node in about two seconds instead of half a minute.
        RAY_health_check_period_ms="500",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    c = RayTestCluster(root, env)
    try:
        c.start_head()
        c.add_workers("rm_node_a", "rm_node_b")
        yield c
    finally:
        c.stop()
        if request.session.testsfailed == failed_before:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nRay test cluster logs kept in {root}", file=sys.stderr)


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Eight blocks (11 work units): enough units in flight to kill things in the middle of a merge."""
    shape = LlamaShape(vocab=512, hidden=64, layers=8, intermediate=176, heads=4, kv_heads=2)
    return make_family(tmp_path_factory.mktemp("slowfam"), shape, 3, dtype=torch.float32, shard_bytes=300_000)


@pytest.fixture(scope="module")
def slow_case(slow_family, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A TIES recipe over ``slow_family`` written to a file, and the local executor's output digests."""
    root = tmp_path_factory.mktemp("slowcase")
    text = case_recipe("ties", slow_family)
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    return recipe, local_reference(text, root / "local")


def run_cli(
    cluster: RayTestCluster, *args: str, slow: bool = False, extra_env: dict[str, str] | None = None, **kw
) -> subprocess.Popen:
    env = {**cluster.env, **(extra_env or {})}
    if slow:
        env["PYTHONPATH"] = str(cluster.root)
        env["RAY_RUNTIME_ENV_HOOK"] = "raymerge_slow_hook.runtime_env_hook"
    return subprocess.Popen([RAYMERGE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out, err


# ------------------------------------------------------------------------------------------------ placement


def test_placement_keeps_each_node_under_budget(family):
    """Admission by declared memory, per node: no Ray needed to check the scheduler's bookkeeping."""
    from raymerge.cluster.nodes import NodeState
    from raymerge.cluster.progress import ClusterProgress
    from raymerge.cluster.scheduler import UnitScheduler
    from raymerge.cluster.units import WorkUnit
    from raymerge.engine.plan import build_plan

    task = build_plan(parse_recipe(case_recipe("ties", family))).tasks[1]
    mib = 1 << 20

    def unit(i: int, size: int) -> WorkUnit:
        return WorkUnit(f"u{i}", (task,), False, size * mib, 0, 0, 0, frozenset())

    nodes = [NodeState(f"{i}" * 56, "127.0.0.1", cpus=4, gpus=0, slots=4, cpus_per_slot=1) for i in range(2)]
    sched = UnitScheduler(
        nodes,
        budget=250 * mib,
        staging_dir="/nowhere",
        device="cpu",
        run_id="r",
        on_done=lambda t, r: None,
        progress=ClusterProgress(0, 0),
        originals={},
    )
    placed: list[tuple[str, str]] = []

    class FakeRemote:
        def options(self, **kw):
            node = kw["scheduling_strategy"].node_id
            return type("R", (), {"remote": lambda _s, tasks, *a: placed.append((node, tasks)) or object()})()

    sched._run_unit = FakeRemote()
    sched.cpu_queue.extend((unit(i, 100), 1) for i in range(6))
    sched.cpu_queue.append((unit(6, 240), 1))
    sched._dispatch()
    # Two 100 MiB units fit a 250 MiB budget per node; slots (4 per node) are not the limit.
    assert sorted(n for n, _ in placed) == ["0" * 56] * 2 + ["1" * 56] * 2
    assert all(n.in_use <= 250 * mib for n in nodes)
    running = list(sched.running.items())
    for ref, run in running[:2]:  # the first unit on each node finishes
        del sched.running[ref]
        sched._release(run)
    sched._dispatch()
    assert len(placed) == 6 and all(n.in_use <= 250 * mib for n in nodes)
    assert sched.cpu_queue[0][0].id == "u6"  # 240 MiB waits for a node to drain: it does not fit beside others
    for ref, run in list(sched.running.items()):
        if run.node is nodes[0]:
            del sched.running[ref]
            sched._release(run)
    sched._dispatch()
    assert placed[-1][0] == nodes[0].node_id and not sched.cpu_queue


# ------------------------------------------------------------------------------------------------ embedded


def test_embedded_ray_matches_local(family, tmp_path, capfd):
    import ray

    text = case_recipe("ties", family)
    want = local_reference(text, tmp_path / "local")
    assert not ray.is_initialized()
    figures = merge(
        parse_recipe(text), tmp_path / "ray", executor=RayExecutor(workers=2), progress=False, out_shard_bytes=150_000
    )
    assert digests(tmp_path / "ray") == want
    assert not ray.is_initialized(), "an embedded Ray is stopped after the merge"
    assert figures.executor == "ray" and figures.bytes_read > 0
    err = capfd.readouterr().err
    assert "Ray run finished" in err and "total" in err


# ------------------------------------------------------------------------------------------------ cluster


def run_on_cluster(
    cluster: RayTestCluster,
    recipe: Path,
    out: Path | str,
    *extra: str,
    slow: bool = False,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``raymerge run`` as a subprocess driver joining the test cluster."""
    return run_cli(
        cluster,
        "run",
        str(recipe),
        str(out),
        "--executor",
        "ray",
        "--address",
        cluster.address,
        "--workers",
        "2",
        "--out-shard-size",
        "150000",
        "-q",
        *extra,
        slow=slow,
        extra_env=extra_env,
    )


def node_rows(stderr: str) -> dict[str, list[str]]:
    """The per-node summary table RayExecutor prints: node label -> its columns."""
    table = stderr.split("Ray run finished", 1)[1].splitlines()[2:]
    return {" ".join(r.split()[:2]): r.split()[2:] for r in table if r.strip() and not r.strip().startswith("total")}


@pytest.mark.parametrize("case", list(CASES))
def test_cluster_matches_local(case, cluster, family, tmp_path):
    text = case_recipe(case, family)
    want = local_reference(text, tmp_path / "local")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    _, err = finish(run_on_cluster(cluster, recipe, tmp_path / "ray"))
    assert digests(tmp_path / "ray") == want
    assert len(node_rows(err)) == 3  # the units were spread over the head and both workers


def test_accelerator_pool_survives_actor_death(cluster, family, tmp_path):
    """A method that prefers an accelerator runs on the actor pool (one actor per CPU slot without
    GPUs); killing an actor mid-unit sends its units to a fresh actor, with the same bytes."""
    base, experts = family
    text = recipe_text("actmat", base, experts)
    want = local_reference(text, tmp_path / "local")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    driver = run_on_cluster(cluster, recipe, tmp_path / "ray", slow=True)
    sids = set(cluster.sessions.values())
    victim = wait_for(lambda: ray_task_procs("AcceleratorWorker.run", sids), 120, "an actor running a unit")
    victim[0].send_signal(signal.SIGKILL)  # type: ignore[index]
    _, err = finish(driver)
    assert digests(tmp_path / "ray") == want
    rows = node_rows(err)
    # Columns: units, on actors, tasks, read GB, written GB, busy s, requeued. The linear weights of
    # both blocks are accelerator units; the killed actor's units were placed again.
    assert sum(int(cols[1]) for cols in rows.values()) >= 2, err
    assert sum(int(cols[-1]) for cols in rows.values()) >= 1, err


def test_task_error_is_one_line_and_keeps_the_journal(cluster, family, tmp_path):
    """A deterministic task error (NaN in an input) fails the merge at once with raymerge's message;
    receipts of the units that finished stay in the journal for a resume."""
    from raymerge.engine.storage import open_checkpoint

    base, experts = family
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    name = "model.layers.1.mlp.up_proj.weight"
    ck = open_checkpoint(str(bad))
    entry = ck.entries[name]
    with open(ck.shard_of[name], "r+b") as f:
        f.seek(entry.start)
        f.write(b"\x00\x00\xc0\x7f")  # float32 NaN
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text("ties", base, [experts[0], bad], {"density": 0.5}, [{"weight": 1.0}] * 2))
    proc = run_on_cluster(cluster, recipe, tmp_path / "out")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-3000:]
    assert f"raymerge: error: input contains NaN or Inf (file {bad}" in err and name in err
    journal = tmp_path / "out.raymerge-staging" / ".raymerge" / "journal.jsonl"
    assert journal.exists() and len(journal.read_text().splitlines()) > 0
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ faults


def test_worker_killed_mid_task(cluster, slow_case, tmp_path):
    recipe, want = slow_case
    out = tmp_path / "out"
    driver = run_on_cluster(cluster, recipe, out, slow=True)
    sids = set(cluster.sessions.values())
    victim = wait_for(lambda: ray_task_procs("run_unit", sids), 120, "a worker running a unit")[0]  # type: ignore[index]
    time.sleep(0.2)  # well inside the unit: it has written some tensors and not reported them
    victim.send_signal(signal.SIGKILL)
    finish(driver)
    assert digests(out) == want


def test_node_stopped_mid_merge(cluster, slow_case, tmp_path):
    recipe, want = slow_case
    cluster.add_workers("rm_node_c")
    victim_sid = cluster.sessions["rm_node_c"]
    out = tmp_path / "out"
    driver = run_on_cluster(cluster, recipe, out, slow=True)
    wait_for(lambda: ray_task_procs("run_unit", {victim_sid}), 120, "node c to run a unit")
    cluster.kill_node("rm_node_c")
    _, err = finish(driver)
    assert "left the cluster" in err
    assert digests(out) == want


def test_driver_killed_then_resumed(cluster, slow_case, tmp_path):
    recipe, want = slow_case
    out = tmp_path / "out"
    journal = tmp_path / "out.raymerge-staging" / ".raymerge" / "journal.jsonl"
    driver = run_on_cluster(cluster, recipe, out, slow=True)

    def journaled() -> int:
        return len(journal.read_text().splitlines()) if journal.exists() else 0

    wait_for(lambda: journaled() >= 10, 120, "ten receipts in the journal")
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)
    done_before = journaled()
    assert not out.exists() and done_before < 75, "the driver was killed before the merge ended"
    stdout, _ = finish(run_on_cluster(cluster, recipe, out))
    resumed = int(re.search(r"\((\d+) resumed\)", stdout).group(1))  # type: ignore[union-attr]
    assert 0 < resumed <= done_before
    assert f"| tasks_resumed | {resumed} |" in (out / "README.md").read_text()
    assert digests(out) == want


def test_cluster_writes_to_s3(cluster, slow_case, tmp_path):
    """Remote output with the Ray executor: workers fill the local staging directory (here every
    node sees ``RAYMERGE_STAGING_ROOT``: one machine), the driver uploads it at commit."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    recipe, want = slow_case
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
        fs.mkdir("merged")
        aws = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "RAYMERGE_STAGING_ROOT": str(tmp_path / "staging"),
        }
        _, err = finish(run_on_cluster(cluster, recipe, "s3://merged/ties", extra_env=aws))
        fs.invalidate_cache()
        got = {
            p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in fs.find("merged/ties")
            if p.endswith(".safetensors")
        }
        assert got == want
        assert len(node_rows(err)) >= 2, err  # more than one node wrote into the staging directory
        assert not list((tmp_path / "staging").iterdir()), "the staging copy is removed after the upload"
    finally:
        server.stop()


# A worker node with Ray's smallest object store (75 MiB minimum), shared by the two tests below.
SMALL_STORE_NODE = "rm_node_e"
SMALL_STORE_ARGS = (f"--object-store-memory={80 << 20}",)

FILLER = """
import os, sys, time
import numpy as np
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
node = sys.argv[2]
stop = sys.argv[3]
chunk = 4 << 20


@ray.remote(num_cpus=0, resources={node: 0.001})
class Filler:
    # Holds ray.put objects on its node's object store: more than fits, so Ray must spill.
    def __init__(self):
        self.refs = []

    def node_id(self):
        return ray.get_runtime_context().get_node_id()

    def fill(self, nbytes):
        while len(self.refs) * chunk < nbytes:
            self.refs.append(ray.put(np.full(chunk, len(self.refs) % 251, dtype=np.uint8)))
        return len(self.refs) * chunk

    def churn(self, k):
        # Free the oldest objects and put new ones: the store keeps evicting and spilling.
        for _ in range(k):
            self.refs.pop(0)
            self.refs.append(ray.put(np.zeros(chunk, dtype=np.uint8)))
        first = ray.get(self.refs[0])
        return int(first.size)


f = Filler.remote()
node_id = ray.get(f.node_id.remote())
cap = next(n["Resources"]["object_store_memory"] for n in ray.nodes() if n["NodeID"] == node_id)
held = ray.get(f.fill.remote(int(2 * cap)))
print("FILLED", node_id, int(cap), held, flush=True)
rounds = 0
while not os.path.exists(stop):
    assert ray.get(f.churn.remote(4)) == chunk
    rounds += 1
    time.sleep(0.05)  # keep the store churning without starving the merge of this machine's CPUs
print("CHURNED", rounds, flush=True)
"""


def test_object_store_pressure(cluster, slow_case, tmp_path):
    """A node whose object store is over-full (twice its capacity held, objects churning and
    spilling throughout) still takes units: tensors never go through the object store, so the
    merge's output is the same bytes."""
    recipe, want = slow_case
    cluster.ensure_worker(SMALL_STORE_NODE, SMALL_STORE_ARGS)
    stop = tmp_path / "stop"
    filler = subprocess.Popen(
        [sys.executable, "-c", FILLER, cluster.address, SMALL_STORE_NODE, str(stop)],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = filler.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("FILLED"), line + filler.stderr.read()  # type: ignore[union-attr]
        _, node_id, cap, held = line.split()
        assert int(cap) <= 80 << 20 and int(held) >= 2 * int(cap)
        _, err = finish(run_on_cluster(cluster, recipe, tmp_path / "out"))
    finally:
        stop.touch()
        out, ferr = filler.communicate(timeout=60)
    assert filler.returncode == 0 and int(out.split()[-1]) > 0, ferr[-3000:]  # it churned during the merge
    assert digests(tmp_path / "out") == want
    rows = node_rows(err)
    pressured = [cols for label, cols in rows.items() if label.endswith(node_id[:8])]
    assert pressured and int(pressured[0][0]) >= 1, err  # the full node ran units


def test_raylet_killed_mid_merge(cluster, slow_case, tmp_path):
    """SIGKILL of a worker node's raylet: its workers die with it and Ray declares the node dead;
    the driver places the node's units elsewhere and the output is the same bytes."""
    recipe, want = slow_case
    sid = cluster.ensure_worker(SMALL_STORE_NODE, SMALL_STORE_ARGS)
    out = tmp_path / "out"
    driver = run_on_cluster(cluster, recipe, out, slow=True)
    wait_for(lambda: ray_task_procs("run_unit", {sid}), 120, "the node to run a unit")
    victim = raylets(sid)
    assert len(victim) == 1
    victim[0].send_signal(signal.SIGKILL)
    try:
        _, err = finish(driver)
    finally:
        cluster.kill_node(SMALL_STORE_NODE)  # its agents outlive the raylet
    assert "left the cluster" in err, err[-3000:]
    rows = node_rows(err)
    assert sum(int(cols[-1]) for cols in rows.values()) >= 1, err  # units requeued
    assert digests(out) == want


# ------------------------------------------------------------------------------------------------ jobs


def test_submit_job(cluster, family, tmp_path):
    text = case_recipe("ties", family)
    want = local_reference(text, tmp_path / "local")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "job-out"
    stdout, stderr = finish(
        run_cli(
            cluster,
            "submit",
            str(recipe),
            "--out",
            str(out),
            "--address",
            cluster.dashboard,
            "--workers",
            "2",
            "--out-shard-size",
            "150000",
        )
    )
    assert "Ray run finished" in stdout and "succeeded" in stderr
    assert digests(out) == want


def test_submit_failing_job_exits_nonzero(cluster, family, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(case_recipe("ties", family))
    out = tmp_path / "exists"
    out.mkdir()  # an existing output without --overwrite: the job's driver refuses it
    proc = run_cli(cluster, "submit", str(recipe), "--out", str(out), "--address", cluster.dashboard)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "already exists" in stdout and "failed" in stderr


def test_every_method_matches_local_on_ray(family, tmp_path):
    """The methods the cluster tests above do not cover, on one embedded Ray session: the rows of
    tests/method_examples.py marked ``ray``."""
    import ray

    from raymerge.engine.methods import METHODS

    from method_examples import EXAMPLES, FALLBACKS

    every_other_method = [e for e in EXAMPLES if e.ray]
    base, experts = family
    # RegMean reads per-expert Gram files: one in×in matrix per linear layer, keyed by module name.
    grams = []
    for i in range(len(experts)):
        g = torch.Generator().manual_seed(i)
        mats = {}
        for name, w in load_dir(base).items():
            if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
                x = torch.randn(4 * w.shape[1], w.shape[1], generator=g)
                mats[name.removesuffix(".weight")] = x.T @ x / x.shape[0]
        path = tmp_path / f"grams{i}.safetensors"
        save_file(mats, str(path))
        grams.append({"grams": str(path)})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for example in every_other_method:
            per_model = grams if example.inputs == "grams" else None
            text = example.recipe(base, experts, extra="raymerge:\n  seed: 1", per_model=per_model)
            want = local_reference(text, tmp_path / f"{example.name}-local")
            merge(
                parse_recipe(text),
                tmp_path / f"{example.name}-ray",
                executor=RayExecutor(workers=2),
                progress=False,
                out_shard_bytes=150_000,
            )
            assert digests(tmp_path / f"{example.name}-ray") == want, example.name
    finally:
        ray.shutdown()
    covered = {e.method for e in every_other_method} | {c[0] for c in CASES.values()} | FALLBACKS
    assert covered >= set(METHODS), set(METHODS) - covered


def test_resume_on_another_cluster_shape_is_bit_identical(family, tmp_path, monkeypatch):
    """An ACTMat merge killed on Ray with 2 slots of 1 thread, resumed with 1 slot of 2 threads:
    every unit computes with the staged run's thread count, so the output is the undisturbed run's."""
    import ray

    from raymerge.engine import writer

    recipe = parse_recipe(recipe_text("actmat", *family))
    shard = 100_000
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        clean = RayExecutor(workers=2)
        merge(recipe, tmp_path / "clean", executor=clean, progress=False, out_shard_bytes=shard)
        assert clean.threads == 1

        real = writer.Staging.record
        seen = {"n": 0}

        def crash_after_five(self, receipt):
            seen["n"] += 1
            if seen["n"] > 5:
                raise RuntimeError("simulated driver crash")
            real(self, receipt)

        monkeypatch.setattr(writer.Staging, "record", crash_after_five)
        with pytest.raises(RuntimeError, match="simulated driver crash"):
            merge(recipe, tmp_path / "out", executor=RayExecutor(workers=2), progress=False, out_shard_bytes=shard)
        monkeypatch.setattr(writer.Staging, "record", real)
        staged = json.loads((tmp_path / "out.raymerge-staging" / ".raymerge" / "plan.json").read_text())
        assert staged["threads"] == 1

        wider = RayExecutor(workers=1)  # on its own it would give each unit both cores
        figures = merge(recipe, tmp_path / "out", executor=wider, progress=False, out_shard_bytes=shard)
        assert figures.tasks_resumed == 5
        assert wider.threads == 1, "the resume computes with the staged run's thread count"
        assert digests(tmp_path / "out") == digests(tmp_path / "clean")
    finally:
        ray.shutdown()


def test_one_thread_count_for_every_node():
    from raymerge.cluster.executor import uniform_threads

    nodes = [{"CPU": 16.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 0.0}]
    assert uniform_threads(nodes, workers=2) == 2  # the 4-core node's slots get 2 cores each
    assert uniform_threads(nodes, workers=8) == 1
    assert uniform_threads([{"CPU": 16.0}], workers=4) == 4
    assert uniform_threads([], workers=4) == 1


def can_hide_paths() -> bool:
    """Whether this machine lets a user start a process in new user and mount namespaces."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_hide_paths(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_map_reduce_over_nodes_that_each_read_their_own_experts(tmp_path):
    """Three nodes, each of which can read the base and only its own expert (the others' directories
    are hidden by its mount namespace): ACTMat's statistics are accumulated per node and reduced,
    and the output equals the single-node merge."""
    root = Path(tempfile.mkdtemp(prefix="rmmr-", dir="/tmp"))
    base, experts = make_family(root / "models", "tiny", 3, dtype=torch.float32, shard_bytes=200_000)
    names = ("rm_head", "rm_node_b", "rm_node_c")
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    c = RayTestCluster(
        root, env, hidden={n: tuple(e for j, e in enumerate(experts) if j != i) for i, n in enumerate(names)}
    )
    text = recipe_text("actmat", base, experts)
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    try:
        c.start_head()
        c.add_workers(*names[1:])
        local_reference(text, tmp_path / "local")
        _, err = finish(run_on_cluster(c, recipe, root / "out"))
    finally:
        c.stop()
    assert "map-reduce over experts" in err
    assert len(node_rows(err)) == 3
    done = re.findall(r"(\d+)/(\d+) tasks", err)  # the progress lines count maps and reduces as run
    assert done and done[-1][0] == done[-1][1], done
    for name, err in map_reduce_errors(root / "out", tmp_path / "local", base).items():
        assert err <= 1e-6, (name, err)
    assert not (root / "out" / ".raymerge" / "partials").exists()
    shutil.rmtree(root, ignore_errors=True)


def test_experts_grouped_by_the_nodes_that_read_them(family, tmp_path):
    """As few groups as the mounts allow, each group's experts in order, each group runnable
    only where all of its experts are; an expert no node reads is one clear error."""
    from raymerge.cluster.mapreduce import expert_groups, split_for_nodes
    from raymerge.cluster.nodes import NodeState
    from raymerge.engine.errors import RaymergeError
    from raymerge.engine.plan import build_plan
    from raymerge.engine.storage import local_path

    base, experts = family
    plan = build_plan(parse_recipe(recipe_text("actmat", base, experts)))
    task = next(t for t in plan.tasks if t.method == "actmat")
    files = [local_path(r.url) for r in task.inputs]  # base, e1, e2, e3

    def node(name: str, hidden: list[int]) -> NodeState:
        return NodeState(name, name, 1, 0, 1, 1, missing_files=frozenset(files[i] for i in hidden))

    a, b, c = node("a", [2]), node("b", [1]), node("c", [1, 2, 3])
    assert expert_groups(task, [a, b, c]) == [(("a",), [0, 2]), (("b",), [1])]
    assert expert_groups(task, [node("x", []), b]) == [(("x",), [0, 1, 2])]
    cut = split_for_nodes(plan.tasks, [a, b], str(tmp_path))
    # Cut: exactly the tasks (in those shards) that neither node can run whole.
    blind = [t for t in plan.tasks if not any(n.sees(local_path(r.url) for r in t.inputs) for n in (a, b))]
    assert task.id in {r.id for r in cut.reduces} and {r.id for r in cut.reduces} == {t.id for t in blind}
    assert {len(m) for m in cut.maps_by_group.values()} == {cut.cut}
    assert len(cut.whole) + cut.cut == len(plan.tasks)
    assert split_for_nodes(plan.tasks, [node("x", []), a], str(tmp_path)).cut == 0
    reducible_tasks = sum(1 for t in plan.tasks if t.method in ("actmat", "mean"))
    assert split_for_nodes(plan.tasks, [node("x", []), a], str(tmp_path), "always").cut == reducible_tasks
    with pytest.raises(RaymergeError, match="no usable Ray node reads expert 2"):
        expert_groups(task, [a, c])
