"""``raymerge submit``: run a merge as a Ray job through the Jobs API, stream its logs, report.

The job's driver runs on the cluster's head node as
``raymerge run recipe.yaml OUT --executor ray --address auto``. The recipe travels as the job's
``working_dir`` (a directory holding only ``recipe.yaml``); relative local model paths and a
relative OUT are made absolute here first, since the job does not run in this directory. The
cluster must have raymerge installed and on ``PATH`` (it runs tasks of the same code anyway),
and the output must be on a file system every node mounts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from raymerge.cluster.connect import use_local_auth_token
from raymerge.engine.errors import RaymergeError, RecipeError
from raymerge.engine.recipe import parse_recipe, read_recipe_text
from raymerge.engine.safeio import load_yaml
from raymerge.engine.stages import documents, is_multi_stage, stage_order
from raymerge.engine.storage import is_local
from raymerge.engine.urls import redact, redact_text

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _absolute(path: Any) -> Any:
    if isinstance(path, str) and is_local(path) and not path.startswith("file://") and not os.path.isabs(path):
        return os.path.abspath(path)
    return path


def portable_recipe(text: str, origin: str) -> str:
    """The recipe with relative local model paths made absolute (validated first); else unchanged.
    A multi-stage recipe keeps its stage names as they are (they are not paths)."""
    if is_multi_stage(text, origin):
        return _portable_stages(text, origin)
    parse_recipe(text, origin)  # fail here, not on the cluster, on a malformed recipe
    raw = load_yaml(text, file=origin, error=RecipeError, what="recipe")
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a mapping", file=origin)
    if not _absolute_paths(raw, set()):
        return text
    log.info("made relative model paths absolute for the job")
    return yaml.safe_dump(raw, sort_keys=False)


def _portable_stages(text: str, origin: str) -> str:
    """Each document of a multi-stage recipe made portable; the stage graph and every stage's
    recipe are checked here first (names resolved against a placeholder directory)."""
    for st in stage_order(text, origin, "/intermediate"):
        parse_recipe(st.text, st.origin(origin))
    docs = documents(text, origin)
    names = {d["name"] for d in docs if isinstance(d.get("name"), str)}
    changed = False
    for doc in docs:
        changed |= _absolute_paths(doc, names)
        if isinstance(doc.get("out_path"), str) and _absolute(doc["out_path"]) != doc["out_path"]:
            doc["out_path"], changed = _absolute(doc["out_path"]), True
    if not changed:
        return text
    log.info("made relative model paths absolute for the job")
    return yaml.safe_dump_all(docs, sort_keys=False)


def _absolute_paths(raw: dict[str, Any], names: set[str]) -> bool:
    """Make ``raw``'s relative local model paths absolute in place (not the stage ``names``);
    whether any changed."""
    changed = False

    def fix(obj: dict[str, Any], key: str) -> None:
        nonlocal changed
        value = obj.get(key)
        if isinstance(value, str) and value.partition("+")[0] in names:
            return
        if key in obj and _absolute(value) != value:
            obj[key] = _absolute(value)
            changed = True

    fix(raw, "base_model")
    for m in raw.get("models") or []:
        if isinstance(m, dict):
            fix(m, "model")
    for piece in raw.get("slices") or []:
        for src in (piece.get("sources") or []) if isinstance(piece, dict) else []:
            if isinstance(src, dict):
                fix(src, "model")
    if raw.get("tokenizer_source") not in (None, "base"):
        fix(raw, "tokenizer_source")
    return changed


def entrypoint(out: str, run_args: list[str]) -> str:
    """The job's shell command: ``raymerge run`` on the uploaded recipe, joining the cluster."""
    cmd = ["raymerge", "run", "recipe.yaml", out, "--executor", "ray", "--address", "auto", "--quiet", *run_args]
    return " ".join(shlex.quote(c) for c in cmd)


def submit_merge(
    recipe_path: str, out: str, *, address: str, run_args: list[str], wait: bool = True, job_id: str | None = None
) -> int:
    """Submit the merge of ``recipe_path`` into ``out`` as a Ray job; return the exit code.

    With ``wait`` the job's logs are streamed to stdout until it ends, and the return value is
    0 when the job SUCCEEDED, else the driver's exit code (or 1). Ctrl-C detaches without
    stopping the job.
    """
    from ray import exceptions as ray_exceptions
    from ray.job_submission import JobSubmissionClient

    text = read_recipe_text(recipe_path)  # bounded and strict, like `raymerge run`
    recipe = portable_recipe(text, recipe_path)
    out_abs = _absolute(out)
    use_local_auth_token()
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, ray_exceptions.AuthenticationError) as exc:
        raise RaymergeError(
            f"cannot reach the Ray Jobs API at {address}: {exc}",
            hint="start the head with --include-dashboard=true (needs ray[default]) and pass its URL as --address",
        ) from None
    with tempfile.TemporaryDirectory(prefix="raymerge-job-") as workdir:
        Path(workdir, "recipe.yaml").write_text(recipe, encoding="utf-8")
        command = entrypoint(out_abs, run_args)
        try:
            submitted = client.submit_job(
                entrypoint=command,
                submission_id=job_id,
                runtime_env={"working_dir": workdir},
                metadata={"raymerge_recipe": os.path.basename(recipe_path), "raymerge_out": out_abs},
            )
        except RuntimeError as exc:
            raise RaymergeError(f"the Ray Jobs API refused the job: {exc}", hint="see the dashboard's logs") from None
    print(
        f"raymerge: submitted job {submitted} to {redact(address)}: {redact_text(command)}", file=sys.stderr, flush=True
    )
    if not wait:
        return 0
    try:
        asyncio.run(_stream_logs(client, submitted))
        status, info = _wait_terminal(client, submitted)
    except KeyboardInterrupt:
        print(
            f"raymerge: detached; job {submitted} keeps running (ray job stop {submitted} --address {redact(address)})",
            file=sys.stderr,
        )
        return 130
    if status == "SUCCEEDED":
        print(f"raymerge: job {submitted} succeeded", file=sys.stderr)
        return 0
    code = getattr(info, "driver_exit_code", None)
    message = getattr(info, "message", "") or ""
    print(f"raymerge: job {submitted} {status.lower()}: {redact_text(message.strip())}", file=sys.stderr)
    return int(code) if isinstance(code, int) and code > 0 else 1


async def _stream_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_terminal(client: Any, job_id: str, timeout_s: float = 60.0) -> tuple[str, Any]:
    """The job's final status (the log stream can end a moment before the status settles)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in _TERMINAL or time.monotonic() > deadline:
            return status, info
        time.sleep(0.5)
