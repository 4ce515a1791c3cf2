"""Connecting the driver to Ray: join an existing cluster, or start a small embedded one.

``RayConnection`` is a context manager. It joins ``address`` (``auto`` or ``HOST:PORT``), or the
``EmbeddedHead`` it is given, or with neither starts a private local Ray in this process sized to
this machine (dashboard off, small object store: tensors never go through it). If this process
is already connected (a notebook, a Ray job that called ``ray.init`` itself) the existing
connection is used and left open on exit.

``EmbeddedHead`` starts the private Ray of one merge in a helper process (head.py) as soon as
the executor is created, so the cluster comes up while the driver imports, plans and already
runs tasks in-process; stopping it kills its processes outright and removes its session files.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Any

import ray

from raymerge.engine.errors import RaymergeError

log = logging.getLogger(__name__)

# Only receipts and task specs go through the object store; Ray's minimum is 75 MiB.
EMBEDDED_OBJECT_STORE_BYTES = 96 << 20


class RayConnection:
    """The driver's Ray session for one merge; ``dashboard_url`` is empty when there is none."""

    def __init__(self, address: str | None, head: EmbeddedHead | None = None) -> None:
        self.address = address
        self.head = head
        self.owned = False
        self.embedded = False
        self.dashboard_url = ""

    def __enter__(self) -> RayConnection:
        if ray.is_initialized():
            log.debug("using the existing Ray connection of this process")
            self.dashboard_url = _dashboard_url(None)
            return self
        # Ray reports usage statistics to the internet by default; a merge never should.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if self.address:
            kwargs["address"] = self.address
        elif self.head is not None:
            self.embedded = True
            kwargs["address"] = self.head.gcs_address()
            use_local_auth_token()  # the head turned token authentication on if a token exists
        else:
            self.embedded = True
            kwargs.update(
                # "local" starts a private instance even if a `ray start` cluster runs on this host.
                address="local",
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
            )
        try:
            context = ray.init(**kwargs)
        except ConnectionError as exc:
            raise RaymergeError(
                f"cannot connect to the Ray cluster at {self.address}: {exc}",
                hint="check --address (auto, or HOST:PORT of the head's GCS), or drop it to run an embedded Ray",
            ) from None
        self.owned = True
        self.dashboard_url = _dashboard_url(context)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.owned:
            return
        if self.head is None:
            ray.shutdown()
            return
        # Leaving the embedded cluster ends this driver's job, and Ray kills its workers; a worker
        # still loading torch for a warm-up task the merge no longer needs would then be reported
        # as an "unhandled error" on stderr. Nothing of the merge is lost: keep that out.
        saved = os.environ.get("RAY_IGNORE_UNHANDLED_ERRORS")
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        try:
            ray.shutdown()
        finally:
            if saved is None:
                os.environ.pop("RAY_IGNORE_UNHANDLED_ERRORS", None)
            else:
                os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = saved


def use_local_auth_token() -> None:
    """Send this machine's Ray token (``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN``) when there is one.

    ``ray start`` and ``ray.init`` without an address turn token authentication on by themselves
    when a token exists, but a driver joining by address and the Jobs SDK do not, so they would be
    refused by a token-protected head. ``RAY_AUTH_MODE``, when set, still decides.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # older Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


HEAD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "head.py")
HEAD_READY = "raymerge-head"  # head.READY: the script is run by path, not imported
HEAD_START_TIMEOUT_S = 120.0


class EmbeddedHead:
    """The private Ray instance of one merge, started in a helper process (see head.py).

    ``start`` returns at once; ``ready`` says (without waiting) whether the instance takes drivers
    or failed to start; ``gcs_address`` waits for it. ``stop`` kills the helper and every Ray
    process under it (no graceful drain: the instance is ours and holds no state worth keeping)
    and deletes its session directory. If the driver dies instead, the helper sees its standard
    input close and does the same.
    """

    def __init__(self, proc: subprocess.Popen[str], temp_dir: str) -> None:
        self.proc = proc
        self.temp_dir = temp_dir
        self._address: str | None = None
        self._done = threading.Event()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        assert proc.stdout is not None and proc.stderr is not None
        threading.Thread(target=self._read_ready, args=(proc.stdout,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True).start()

    @classmethod
    def start(cls, num_cpus: int) -> EmbeddedHead:
        # Ray's socket paths must fit in 107 bytes: keep the session directory short.
        temp_dir = tempfile.mkdtemp(prefix="rmhead-", dir="/tmp" if os.path.isdir("/tmp") else None)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")  # a merge never reports to the internet
        proc = subprocess.Popen(
            [sys.executable, HEAD_SCRIPT, str(num_cpus), str(EMBEDDED_OBJECT_STORE_BYTES), temp_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the driver, which stops it
        )
        log.debug("embedded Ray head starting (pid %d, %s)", proc.pid, temp_dir)
        return cls(proc, temp_dir)

    def _read_ready(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(HEAD_READY + " "):
                self._address = line.split()[1]
                break
        self._done.set()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self._stderr.append(line.rstrip())

    def ready(self) -> bool:
        """Whether the head takes drivers now, or has failed to start (``gcs_address`` then raises)."""
        return self._done.is_set()

    def gcs_address(self, timeout_s: float = HEAD_START_TIMEOUT_S) -> str:
        if not self._done.wait(timeout_s) or self._address is None:
            self.stop()
            detail = "; ".join(list(self._stderr)[-3:]) or f"no answer in {timeout_s:.0f} s"
            raise RaymergeError(
                f"the embedded Ray did not start: {detail}",
                hint="see Ray's requirements, or use --executor local",
            )
        return self._address

    def stop(self) -> None:
        """Kill the helper and its Ray processes, and remove the session directory (idempotent)."""
        import psutil

        procs: list[psutil.Process] = []
        try:
            helper = psutil.Process(self.proc.pid)
            procs = [*helper.children(recursive=True), helper]
        except psutil.NoSuchProcess:
            pass
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()
        # Dead is enough: a killed grandchild stays a zombie until init reaps it, which can take
        # a second; waiting for that would only add to every merge's wall.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.01)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(proc: Any) -> bool:
    """Whether a ``psutil.Process`` still runs (a zombie has exited)."""
    import psutil

    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _dashboard_url(context: Any) -> str:
    """The dashboard address of the connected cluster as a URL, or "" when it has none."""
    if context is not None:
        url = str(getattr(context, "dashboard_url", "") or "")
    else:
        try:
            url = str(ray._private.worker.get_dashboard_url() or "")
        except Exception:  # noqa: BLE001 - a private helper; the URL is only informative
            url = ""
    if url and "://" not in url:
        url = "http://" + url
    return url
