"""S3 for real: moto's server on 127.0.0.1 behind a counting, fault-injecting HTTP proxy, used
through s3fs exactly as a deployment would (``AWS_ENDPOINT_URL``).

Merges read their inputs from ``s3://`` with range requests only (bytes counted on the wire),
write their output to ``s3://`` (staged locally, uploaded with the loader's entry points last),
and survive injected 5xx responses through raymerge's own retry path (``storage.with_retries``):
botocore's retries are switched off here (``AWS_MAX_ATTEMPTS=1``) so every injected error reaches it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

import raymerge.engine.storage as storage  # noqa: E402
from raymerge.engine.errors import CheckpointError, OutputError  # noqa: E402
from raymerge.engine.merge import merge  # noqa: E402
from raymerge.engine.plan import build_plan  # noqa: E402
from raymerge.engine.recipe import parse_recipe  # noqa: E402
from raymerge.engine.task import run_task  # noqa: E402
from raymerge.engine.verify import verify_model  # noqa: E402

from conftest import presize_shards, recipe_text  # noqa: E402

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


@dataclass
class Exchange:
    method: str
    path: str  # bucket/key, no query string
    query: str
    range: str | None
    status: int
    sent: int  # response body bytes sent to the client
    received: int  # request body bytes from the client
    injected: bool


@dataclass
class Fault:
    method: str
    pattern: str  # regex searched in bucket/key
    ranged: bool | None  # only ranged (True) / unranged (False) requests, or any (None)
    remaining: int  # -1: forever
    skip: int = 0  # let this many matching requests through first
    status: int = 503


class S3Proxy:
    """Forwards every request to moto unchanged, records it, and answers injected faults itself."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.log: list[Exchange] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                path, _, query = self.path.lstrip("/").partition("?")
                rng = self.headers.get("Range")
                fault = proxy._take_fault(self.command, path, rng)
                if fault is not None:
                    data = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                        b"<Message>injected by the test proxy</Message></Error>"
                    )
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    proxy._record(Exchange(self.command, path, query, rng, fault.status, 0, len(body), True))
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    sent = 0 if self.command == "HEAD" else len(data)
                    # Recorded before the body goes out: once the client has its bytes, the test may
                    # read the log at once, and a record made after the write could still be missing.
                    proxy._record(Exchange(self.command, path, query, rng, resp.status, sent, len(body), False))
                    if sent:
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _take_fault(self, method: str, path: str, rng: str | None) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.remaining == 0 or f.method != method or not re.search(f.pattern, path):
                    continue
                if f.ranged is not None and f.ranged != (rng is not None):
                    continue
                if f.skip > 0:
                    f.skip -= 1
                    continue
                if f.remaining > 0:
                    f.remaining -= 1
                return f
        return None

    def _record(self, ex: Exchange) -> None:
        with self.lock:
            self.log.append(ex)

    def inject(self, method: str, pattern: str, count: int, *, ranged: bool | None = None, skip: int = 0) -> Fault:
        fault = Fault(method, pattern, ranged, count, skip)
        with self.lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.faults.clear()

    def exchanges(self, method: str, pattern: str = "") -> list[Exchange]:
        with self.lock:
            return [e for e in self.log if e.method == method and re.search(pattern, e.path)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class S3:
    proxy: S3Proxy
    fs: object
    base: str
    experts: list[str]


@pytest.fixture(scope="module")
def s3(family) -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = S3Proxy(server.get_host_and_port())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("models")
        fs.mkdir("out")
        base, experts = family
        for d in (base, *experts):
            fs.put(str(d), f"models/{d.name}", recursive=True)
        try:
            yield S3(proxy, fs, f"s3://models/{base.name}", [f"s3://models/{e.name}" for e in experts])
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proxy.close()
            server.stop()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    monkeypatch.setenv("RAYMERGE_STAGING_ROOT", str(tmp_path / "staging"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_digests(path: Path) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted(path.glob("*.safetensors"))}


def remote_files(s3: S3, prefix: str) -> dict[str, bytes]:
    s3.fs.invalidate_cache()  # type: ignore[attr-defined]
    root = prefix.removeprefix("s3://")
    return {p[len(root) + 1 :]: s3.fs.cat_file(p) for p in s3.fs.find(root)}  # type: ignore[attr-defined]


def header_bytes(model_dir: Path) -> int:
    """8-byte length prefix plus JSON header of every safetensors shard of a local model."""
    return sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in model_dir.glob("*.safetensors"))


TA = ("task_arithmetic", {"lambda": 0.5}, [{"weight": 1.0}, {"weight": 0.7}, {"weight": 0.4}])


def test_s3_in_s3_out_bit_identical_with_range_reads_only(s3, family, tmp_path):
    base, experts = family
    method, params, per_model = TA
    local_text = recipe_text(method, base, experts, params, per_model)
    merge(parse_recipe(local_text), tmp_path / "local", progress=False, out_shard_bytes=150_000)
    want = local_digests(tmp_path / "local")
    tensor_bytes = build_plan(parse_recipe(local_text)).read_bytes
    s3.proxy.reset()
    out = "s3://out/ta"
    figures = merge(
        parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model)),
        out,
        progress=False,
        out_shard_bytes=150_000,
        workers=2,
    )

    # (a) the output, downloaded, is byte for byte the local merge and passes `raymerge verify`.
    got = remote_files(s3, out)
    assert {n: sha(b) for n, b in got.items() if n.endswith(".safetensors")} == want
    down = tmp_path / "down"
    for name, data in got.items():
        (down / name).parent.mkdir(parents=True, exist_ok=True)
        (down / name).write_bytes(data)
    assert verify_model(down).tasks_checked == figures.tasks
    assert json.loads(got["config.json"]) == json.loads((tmp_path / "local" / "config.json").read_text())
    assert not list((tmp_path / "staging").iterdir()), "the local staging copy is removed after upload"

    # (c) inputs: only ranged GETs on shards, and exactly the headers plus each task's tensor bytes.
    shard_gets = s3.proxy.exchanges("GET", r"^models/.*\.safetensors$")
    assert shard_gets and all(e.range for e in shard_gets), [e for e in shard_gets if not e.range][:3]
    fetched = sum(e.sent for e in shard_gets)
    headers = sum(header_bytes(d) for d in (base, *experts))
    assert fetched == headers + tensor_bytes, (fetched, headers, tensor_bytes)
    assert figures.bytes_read == fetched  # the figure counts the same bytes: headers + tensors

    # (b) outputs: every file PUT once, the index last (no model.safetensors: the output is sharded).
    puts = [e for e in s3.proxy.exchanges("PUT", r"^out/ta/") if not e.path.endswith("write-probe")]
    assert sorted(e.path.removeprefix("out/ta/") for e in puts) == sorted(got)
    assert puts[-1].path == "out/ta/model.safetensors.index.json"
    assert sum(e.received for e in puts) == sum(len(b) for b in got.values())


def test_s3_tasks_read_only_their_tensors(s3, family, tmp_path):
    """A few tasks of a plan fetch exactly their tensors' bytes, a sliver of the shards they live in."""
    base, experts = family
    method, params, per_model = TA
    plan = build_plan(parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model)))
    picked = [
        t
        for t in plan.tasks
        if t.tensor in ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.self_attn.k_proj.weight")
    ]
    assert len(picked) == 2
    staging = tmp_path / "partial"
    presize_shards(staging, plan.shards)
    s3.proxy.reset()
    for t in picked:
        run_task(t, str(staging))
    gets = s3.proxy.exchanges("GET", r"\.safetensors$")
    fetched = sum(e.sent for e in gets)
    needed = sum(t.read_bytes for t in picked)
    assert all(e.range for e in gets) and fetched == needed, (fetched, needed)
    shards_touched = {r.url.removeprefix("s3://") for t in picked for r in t.inputs}
    shard_sizes = sum(s3.fs.size(p) for p in shards_touched)  # type: ignore[attr-defined]
    assert needed * 20 < shard_sizes, (needed, shard_sizes)
    # And the bytes are right: identical to the same spans of a local merge with the same layout.
    merge(parse_recipe(recipe_text(method, base, experts, params, per_model)), tmp_path / "local", progress=False)
    for t in picked:
        o = t.output
        with open(staging / o.shard, "rb") as a, open(tmp_path / "local" / o.shard, "rb") as b:
            a.seek(o.offset)
            b.seek(o.offset)
            assert a.read(o.nbytes) == b.read(o.nbytes), t.id


def test_s3_5xx_are_retried_by_the_engine(s3, family, tmp_path, caplog):
    base, experts = family
    method, params, per_model = TA
    merge(parse_recipe(recipe_text(method, base, experts, params, per_model)), tmp_path / "local", progress=False)
    s3.proxy.reset()
    # Past planning (two header reads per shard), so the failures hit the tasks' tensor reads.
    header_reads = 2 * len(list(experts[1].glob("*.safetensors")))
    reads = s3.proxy.inject("GET", r"^models/expert1/.*\.safetensors$", 3, ranged=True, skip=header_reads)
    stats = s3.proxy.inject("HEAD", r"^models/expert2/.*\.safetensors$", 1)
    uploads = s3.proxy.inject("PUT", r"^out/flaky/model\.safetensors$", 2)
    caplog.set_level(logging.WARNING, logger="raymerge.engine.storage")
    merge(
        parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model)),
        "s3://out/flaky",
        progress=False,
        workers=1,
    )
    assert reads.remaining == stats.remaining == uploads.remaining == 0
    injected = [e for e in s3.proxy.log if e.injected]
    assert len(injected) == 6
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    # Each injected 503 surfaced once in with_retries (botocore's own retries are off in this module).
    assert len(retried) == 6, retried
    assert sum("range read" in m and "expert1" in m for m in retried) == 3
    assert sum(m.startswith("upload of s3://out/flaky/model.safetensors failed") for m in retried) == 2
    assert sum(m.startswith("stat of s3://models/expert2/") for m in retried) == 1
    got = remote_files(s3, "s3://out/flaky")
    assert {n: sha(b) for n, b in got.items() if n.endswith(".safetensors")} == local_digests(tmp_path / "local")

    # A store that keeps failing: one clear line after five attempts, nothing published.
    storage.clear_shard_cache()
    s3.proxy.reset()
    s3.proxy.inject("GET", r"^models/expert0/.*\.safetensors$", -1, ranged=True)
    with pytest.raises(CheckpointError, match="failed after 5 attempts") as exc:
        merge(
            parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model)), "s3://out/dead", progress=False
        )
    assert "s3://models/expert0/" in str(exc.value) and "\n" not in str(exc.value)
    assert not remote_files(s3, "s3://out/dead")


def test_s3_failed_upload_never_looks_like_a_model_and_resumes(s3, family, tmp_path):
    base, experts = family
    method, params, per_model = TA
    merge(
        parse_recipe(recipe_text(method, base, experts, params, per_model)),
        tmp_path / "local",
        progress=False,
        out_shard_bytes=150_000,
    )
    recipe = parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model))
    s3.proxy.reset()
    s3.proxy.inject("PUT", r"^out/cut/model\.safetensors\.index\.json$", -1)  # the last object never lands
    with pytest.raises(OutputError, match="upload failed after 5 attempts") as exc:
        merge(recipe, "s3://out/cut", progress=False, out_shard_bytes=150_000)
    assert "s3://out/cut/model.safetensors.index.json" in str(exc.value)
    partial = remote_files(s3, "s3://out/cut")
    assert any(n.startswith("model-") for n in partial), "the shards went up first"
    assert "model.safetensors.index.json" not in partial and "model.safetensors" not in partial
    staged = list((tmp_path / "staging").iterdir())
    assert len(staged) == 1 and (staged[0] / ".raymerge" / "journal.jsonl").exists(), "staging kept for resume"

    s3.proxy.reset()
    figures = merge(recipe, "s3://out/cut", progress=False, out_shard_bytes=150_000)
    assert figures.tasks_resumed == figures.tasks
    resent = {e.path.removeprefix("out/cut/") for e in s3.proxy.exchanges("PUT", r"^out/cut/")}
    assert not any(n.endswith(".safetensors") for n in resent), f"shards uploaded again: {sorted(resent)}"
    assert "model.safetensors.index.json" in resent
    got = remote_files(s3, "s3://out/cut")
    assert {n: sha(b) for n, b in got.items() if n.endswith(".safetensors")} == local_digests(tmp_path / "local")

    # An existing model is refused without --overwrite, before any compute.
    s3.proxy.reset()
    with pytest.raises(OutputError, match="already holds a model"):
        merge(recipe, "s3://out/cut", progress=False)
    headers = sum(header_bytes(d) for d in (base, *experts))
    assert sum(e.sent for e in s3.proxy.exchanges("GET", r"^models/.*\.safetensors$")) <= headers, "no task ran"


def test_s3_overwrite_replaces_the_model_and_removes_stale_objects(s3, family, tmp_path, capsys):
    method, params, per_model = TA
    recipe = parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model))
    merge(recipe, "s3://out/ow", progress=False, out_shard_bytes=150_000)
    before = remote_files(s3, "s3://out/ow")
    assert sum(n.startswith("model-") for n in before) > 1
    s3.proxy.reset()
    capsys.readouterr()
    merge(recipe, "s3://out/ow", progress=True, overwrite=True)  # one shard now
    after = remote_files(s3, "s3://out/ow")
    bar = capsys.readouterr().err
    total = sum(len(b) for b in after.values())
    assert "upload s3://out/ow" in bar and "100%" in bar, bar[-2000:]
    assert s3.proxy.exchanges("PUT") and sum(e.received for e in s3.proxy.exchanges("PUT", "^out/ow/")) >= total
    assert "model.safetensors" in after and not any(n.startswith("model-") for n in after)
    ops = [
        (e.method, e.path.removeprefix("out/ow/"))
        for e in s3.proxy.log
        if e.method in ("PUT", "DELETE") and e.path.startswith("out/ow/") and "write-probe" not in e.path
    ]
    # The old model stops being loadable first; the new one becomes loadable last.
    assert ops[0] == ("DELETE", "model.safetensors") or ops[0] == ("DELETE", "model.safetensors.index.json")
    assert ops[-2:] == [("PUT", "model.safetensors"), ("PUT", "model.safetensors.index.json")]


def test_s3_bin_expert_with_opt_in(s3, family, tmp_path):
    """A pickle checkpoint on S3: tensor table from the zip directory via small ranged reads."""
    base, experts = family
    from safetensors import safe_open

    state = {}
    for f in sorted(experts[0].glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            state.update({k: sf.get_tensor(k) for k in sf.keys()})
    torch.save(state, tmp_path / "pytorch_model.bin")
    s3.fs.put_file(str(tmp_path / "pytorch_model.bin"), "models/binexpert/pytorch_model.bin")
    s3.fs.put_file(str(experts[0] / "config.json"), "models/binexpert/config.json")
    size = os.path.getsize(tmp_path / "pytorch_model.bin")
    params = [{"weight": 1.0}, {"weight": 0.5}]
    text = recipe_text(
        "task_arithmetic",
        s3.base,
        ["s3://models/binexpert", s3.experts[1]],
        None,
        params,
        extra="raymerge:\n  allow_pickle_bin: true",
    )
    with pytest.raises(CheckpointError, match="allow_pickle_bin"):
        build_plan(parse_recipe(text.replace("allow_pickle_bin: true", "allow_pickle_bin: false")))
    s3.proxy.reset()
    merge(parse_recipe(text), tmp_path / "from-s3", progress=False)
    merge(
        parse_recipe(recipe_text("task_arithmetic", base, [experts[0], experts[1]], None, params)),
        tmp_path / "local",
        progress=False,
    )
    assert local_digests(tmp_path / "from-s3") == local_digests(tmp_path / "local")
    gets = s3.proxy.exchanges("GET", r"binexpert/pytorch_model\.bin$")
    assert gets and all(e.range for e in gets)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    # The zip directory and pickle came in at most three 64 KiB blocks; the rest is each tensor once.
    metadata = sum(e.sent for e in gets) - tensor_bytes
    assert 0 < metadata <= 3 * 65536 < size, (metadata, size)


def test_s3_unwritable_output_fails_before_compute(s3, family, tmp_path):
    method, params, per_model = TA
    recipe = parse_recipe(recipe_text(method, s3.base, s3.experts, params, per_model))
    s3.proxy.reset()
    with pytest.raises(OutputError, match="test write") as exc:
        merge(recipe, "s3://no-such-bucket/merged", progress=False)
    assert "s3://no-such-bucket/merged/.raymerge/write-probe" in str(exc.value)
    assert not list((tmp_path / "staging").glob("*")), "nothing staged"
    headers = sum(header_bytes(d) for d in (family[0], *family[1]))
    assert sum(e.sent for e in s3.proxy.exchanges("GET", r"^models/.*\.safetensors$")) <= headers, "no task ran"


def _tree(local: Path) -> dict[str, bytes]:
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}


def _entry_point_last(s3: S3, prefix: str) -> None:
    puts = [e.path for e in s3.proxy.exchanges("PUT", f"^{prefix}/") if not e.path.endswith("write-probe")]
    assert puts and puts[-1] == f"{prefix}/model.safetensors.index.json", puts


def test_s3_align_and_tact_fold_publish_to_s3_like_merges(s3, family, tmp_path):
    """``align`` and TACT ``fold`` write through the merges' publisher: staged locally, uploaded
    with the index last, the local copy removed, an existing model refused without overwrite."""
    from raymerge.engine.align import align_checkpoints
    from raymerge.engine.errors import AlignmentError
    from raymerge.engine.tact import Corrections, PointCorrection, TactError, fold_corrections

    base, experts = family
    align_checkpoints(str(base), str(experts[0]), tmp_path / "a", also=[(str(experts[1]), tmp_path / "a1")])
    s3.proxy.reset()
    outs = ("s3://out/aligned", "s3://out/aligned1")
    report = align_checkpoints(s3.base, s3.experts[0], outs[0], also=[(s3.experts[1], outs[1])])
    assert report.outputs == outs
    for url, local in zip(outs, (tmp_path / "a", tmp_path / "a1")):
        got, want = remote_files(s3, url), _tree(local)
        assert got.keys() == want.keys() and "model.safetensors.index.json" in got
        summary = ".raymerge/alignment.json"  # names the inputs: s3:// URLs here, local paths there
        assert {n: b for n, b in got.items() if n != summary} == {n: b for n, b in want.items() if n != summary}
        _entry_point_last(s3, url.removeprefix("s3://"))
    assert not list((tmp_path / "staging").iterdir()), "the local staging copies are removed after upload"
    with pytest.raises(AlignmentError, match="already holds a model.*s3://out/aligned"):
        align_checkpoints(s3.base, s3.experts[0], outs[0])

    # A made-up correction of one MLP projection of the base (folding switches Llama's mlp_bias on).
    n = 176  # the tiny family's intermediate_size
    point, stat = "model.layers.0.mlp.gate_proj", torch.ones(n, dtype=torch.float64)
    corr = Corrections(
        "t",
        (
            PointCorrection(
                point,
                torch.linspace(0.9, 1.1, n),
                torch.linspace(-0.1, 0.1, n),
                stat,
                stat,
                stat,
                stat,
                point,
                "linear",
            ),
        ),
        1e-6,
        1,
    )
    fold_corrections(base, corr, tmp_path / "f")
    s3.proxy.reset()
    assert fold_corrections(base, corr, "s3://out/folded") == "s3://out/folded"
    assert remote_files(s3, "s3://out/folded") == _tree(tmp_path / "f")
    _entry_point_last(s3, "out/folded")
    with pytest.raises(TactError, match="already holds a model"):
        fold_corrections(base, corr, "s3://out/folded")
    assert fold_corrections(base, corr, "s3://out/folded", overwrite=True) == "s3://out/folded"
    assert not list((tmp_path / "staging").iterdir())
