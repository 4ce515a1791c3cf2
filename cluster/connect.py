"""Connecting the driver to Ray: join an existing cluster, or start a small embedded one.

``RayConnection`` is a context manager. It joins ``address`` (``auto`` or ``HOST:PORT``) or, with
no address, starts a private local Ray sized to this machine (dashboard off, small object store:
tensors never go through it). If this process is already connected (a notebook, a Ray job that
called ``ray.init`` itself) the existing connection is used and left open on exit.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

import ray

from raymerge.engine.errors import RaymergeError

log = logging.getLogger(__name__)

# Only receipts and task specs go through the object store; Ray's minimum is 75 MiB.
EMBEDDED_OBJECT_STORE_BYTES = 96 << 20


class RayConnection:
    """The driver's Ray session for one merge; ``dashboard_url`` is empty when there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address
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
        if self.owned:
            ray.shutdown()


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
