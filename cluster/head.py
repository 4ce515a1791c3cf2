"""The embedded Ray head: a helper process that owns the private Ray instance of one merge.

Run as a script (``python head.py NUM_CPUS OBJECT_STORE_BYTES TEMP_DIR``), not imported: it needs
only Ray, so it starts in a fraction of the time the driver takes to import torch and plan. It
starts Ray (dashboard off, usage statistics off, sessions under TEMP_DIR), prints one line
``raymerge-head GCS_ADDRESS`` when the instance takes drivers, then waits for its standard input
to close. The driver keeps that pipe open while it uses the cluster; when it closes it (the merge
is done) or dies (the pipe closes with it), this process kills every process it started
(GCS, raylet, agents, workers) without a graceful drain and removes TEMP_DIR, so neither
processes nor session directories outlive the merge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys

READY = "raymerge-head"
# The whole embedded cluster starts as background work (see main).
HEAD_NICENESS = 10


def _kill_tree() -> None:
    """SIGKILL every descendant of this process (the Ray instance), then reap them."""
    import psutil

    me = psutil.Process()
    kids = me.children(recursive=True)
    for k in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            k.kill()
    psutil.wait_procs(kids, timeout=2)


def main(argv: list[str]) -> int:
    num_cpus, store_bytes, temp_dir = int(argv[0]), int(argv[1]), argv[2]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Starting the cluster is background work: the driver runs tasks meanwhile, and on a small
    # machine Ray's start-up and upkeep (GCS, raylet, agents, monitors: several seconds of CPU)
    # slowed a 10 s merge by half when it competed at the driver's priority. Every process of
    # the cluster inherits this niceness, its workers included.
    with contextlib.suppress(OSError):
        os.nice(HEAD_NICENESS)
    # The driver closing stdin is the signal to stop; SIGTERM (a Ctrl-C'd process group) too.
    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
    try:
        import ray

        ctx = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=store_bytes,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _temp_dir=temp_dir,
            # Ray adds 15 to its workers' niceness: on top of the 10 above, any other work on the
            # machine would starve them once they run the merge's units. No idle
            # workers are started ahead (each loads Python, ~0.7 s of CPU while the driver works):
            # the driver starts its own when it hands over.
            _system_config={
                "worker_niceness": 0,
                "enable_worker_prestart": False,
                "prestart_worker_first_driver": False,
            },
        )
        print(f"{READY} {ctx.address_info['gcs_address']}", flush=True)  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.read()  # until the driver closes the pipe or exits
    finally:
        _kill_tree()
        shutil.rmtree(temp_dir, ignore_errors=True)
        # Skip Ray's exit hooks: they would wait for the GCS that was just killed.
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
