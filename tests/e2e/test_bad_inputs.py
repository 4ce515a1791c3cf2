"""Hostile inputs (issues 17 and 18): every case ends in exactly one ``raymerge: error:`` line that
names the file, a non-zero exit and no output — never a traceback, a hang, an "internal error"
(the last-resort handler is for the unforeseen only) or a file read without bound."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import recipe_text

RAYMERGE = [sys.executable, "-m", "raymerge.cli"]


def _main(capsys, *args: str) -> tuple[int, str]:
    """``raymerge ARGS`` in this process: its exit code and its one stderr line (asserted)."""
    from raymerge.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), err
    assert "internal error" not in lines[0] and "Traceback" not in err, err
    return code, lines[0]


def _subprocess(*args: str, cwd: Path | None = None) -> str:
    """The same through a real process, with a timeout: for cases that could hang (FIFOs)."""
    proc = subprocess.run([*RAYMERGE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), proc.stderr
    assert "internal error" not in lines[0] and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def models(family, tmp_path) -> tuple[Path, list[Path]]:
    """A private copy of the base and two experts, free to damage."""
    base, experts = family
    copies = []
    for src in [base, *experts[:2]]:
        dst = tmp_path / "models" / src.name
        shutil.copytree(src, dst)
        copies.append(dst)
    return copies[0], copies[1:]


def _recipe(tmp_path: Path, base: Path, experts: list[Path], extra: str = "") -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * len(experts), extra))
    return r


JSON_BODIES = {
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "5000-digit-int": b'{"a": ' + b"9" * 5000 + b"}",
    "list": b"[1, 2]",
    "null": b"null",
    "duplicate-key": b'{"weight_map": {}, "weight_map": {}}',
    "not-utf8": b'{"a": "\xff\xfe"}',
    "truncated": b'{"weight_map": {"a": ',
}
SPECIAL = ["dev-zero", "directory", "fifo"]


def _plant(path: Path, kind: str | bytes) -> None:
    path.unlink()
    if isinstance(kind, bytes):
        path.write_bytes(kind)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("body", [*JSON_BODIES, *SPECIAL])
def test_malformed_json_side_files(models, tmp_path, name, body):
    base, experts = models
    target = experts[0] / name
    _plant(target, JSON_BODIES.get(body, body))
    out = tmp_path / "out"
    line = _subprocess("run", str(_recipe(tmp_path, base, experts)), str(out), "-q")
    assert str(target) in line, line
    assert not out.exists() and not (tmp_path / "out.raymerge-staging").exists()


def test_index_with_empty_weight_map_is_refused(models, tmp_path, capsys):
    base, experts = models
    (experts[0] / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    _, line = _main(capsys, "run", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "-q")
    assert "empty weight_map" in line and "expert" in line


def _safetensors(path: Path, header_json: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


def test_duplicate_tensor_key_in_header_is_refused(models, tmp_path, capsys):
    base, experts = models
    shard = sorted(experts[0].glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + hlen].decode()
    first = header.index('"', header.index("{") + 1)
    key = header[first : header.index('"', first + 1) + 1]
    entry_start = header.index("{", first)
    entry = header[entry_start : header.index("}", entry_start) + 1]
    doubled = header[:-1] + f",{key}:{entry}" + "}"
    _safetensors(shard, doubled.encode(), raw[8 + hlen :])
    _, line = _main(capsys, "run", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "-q")
    assert "duplicate key" in line and shard.name in line


@pytest.mark.parametrize("kind", ["file", "device"])
def test_model_path_that_is_not_a_directory(models, tmp_path, capsys, kind):
    base, experts = models
    if kind == "file":
        bogus = tmp_path / "model.txt"
        bogus.write_text("not a model")
    else:
        bogus = Path("/dev/null")
    _, line = _main(capsys, "run", str(_recipe(tmp_path, base, [experts[0], bogus])), str(tmp_path / "out"), "-q")
    assert "not a directory" in line and str(bogus) in line


RECIPE_BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
merge_method: *i
"""


@pytest.mark.parametrize(
    "case",
    [
        "alias-bomb",
        "alias-bomb-second-document",
        "not-utf8",
        "method-mapping",
        "bad-exclude-regex",
        "deep-nesting",
        "list",
        "fifo",
        "dev-zero",
        "dir",
    ],
)
def test_recipe_hazards(models, tmp_path, case):
    base, experts = models
    r = tmp_path / "r.yaml"
    good = recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * 2)
    if case == "alias-bomb":
        r.write_text(RECIPE_BOMB)
    elif case == "alias-bomb-second-document":  # a multi-stage recipe's documents are bounded one by one
        r.write_text(good + "---\n" + RECIPE_BOMB)
    elif case == "not-utf8":
        r.write_bytes(good.encode() + b"# \xff\xfe\n")
    elif case == "method-mapping":
        r.write_text(good.replace("merge_method: ties", "merge_method: {ties: 1}"))
    elif case == "bad-exclude-regex":
        r.write_text(good + "raymerge:\n  exclude: ['mlp.(up']\n")
    elif case == "deep-nesting":
        r.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    elif case == "list":
        r.write_text("- merge_method: ties\n")
    elif case == "fifo":
        os.mkfifo(r)
    elif case == "dev-zero":
        r.symlink_to("/dev/zero")
    else:
        r.mkdir()
    line = _subprocess("run", str(r), str(tmp_path / "out"), "-q")
    assert str(r) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--workers", "-1"], "--workers"),
        (["--workers", "0"], "--workers"),
        (["--memory-budget", "0"], "--memory-budget"),
        (["--out-shard-size", "0"], "--out-shard-size"),
        (["--memory-budget", "9" * 400], "--memory-budget"),
    ],
)
def test_bad_numbers_on_the_command_line(family, tmp_path, capsys, args, needle):
    base, experts = family
    r = _recipe(tmp_path, base, experts)
    code, line = _main(capsys, "run", str(r), str(tmp_path / "out"), *args)
    assert code == 2 and needle in line


def test_merge_api_refuses_zero_budget(family, tmp_path):
    from raymerge.engine.errors import PlanError
    from raymerge.engine.merge import merge
    from raymerge.engine.recipe import load_recipe

    with pytest.raises(PlanError, match="memory budget"):
        merge(load_recipe(_recipe(tmp_path, *family)), tmp_path / "out", memory_budget=0, progress=False)


@pytest.mark.parametrize("case", ["root", "too-long", "parent-is-file", "inside-input", "dot-overwrite", "read-only"])
def test_output_path_hazards(models, tmp_path, capsys, monkeypatch, case):
    base, experts = models
    r = _recipe(tmp_path, base, experts)
    extra: list[str] = []
    if case == "root":
        out, needle = "/", "root directory"
    elif case == "too-long":
        out, needle = str(tmp_path / ("m" * 250)), "staging suffix"
    elif case == "parent-is-file":
        (tmp_path / "plain").write_text("x")
        out, needle = str(tmp_path / "plain" / "out"), "is a file"
    elif case == "inside-input":
        out, needle = str(experts[0] / "merged"), "inside the input model"
    elif case == "dot-overwrite":
        here = tmp_path / "here"
        here.mkdir()
        monkeypatch.chdir(here)
        out, needle, extra = ".", "current directory", ["--overwrite"]
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere; what it cannot see is a read-only mount
            monkeypatch.setattr(os, "access", lambda *a, **k: False)
        out, needle = str(ro / "out"), "cannot write"
    _, line = _main(capsys, "run", str(r), out, "-q", *extra)
    assert needle in line, line
    if case == "dot-overwrite":
        assert os.listdir(".") == []
    assert not any(p.name.endswith(".raymerge-staging") for p in tmp_path.rglob("*"))


def test_zero_row_tensor_with_ties_and_many_dims(tmp_path, capsys):
    """Odd but valid tensors merge (a 0-row weight under TIES); > 64 dims is one line."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from raymerge.engine.storage import clear_shard_cache

    dirs = []
    for name in ("base", "e1", "e2"):
        d = tmp_path / name
        d.mkdir()
        save_file(
            {"model.layers.0.mlp.up_proj.weight": torch.zeros(0, 4), "model.norm.weight": torch.ones(4)},
            d / "model.safetensors",
        )
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
        dirs.append(d)
    r = _recipe(tmp_path, dirs[0], dirs[1:])
    from raymerge.cli import main

    assert main(["run", str(r), str(tmp_path / "out"), "-q"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["model.layers.0.mlp.up_proj.weight"].shape == (0, 4)
    assert torch.equal(got["model.norm.weight"], torch.ones(4))
    assert main(["verify", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    header = json.dumps({"x.weight": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}).encode()
    for d in dirs:
        _safetensors(d / "model.safetensors", header, b"\0" * 4)
    clear_shard_cache()  # this process read the old files; a new `raymerge run` would not have
    _, line = _main(capsys, "run", str(r), str(tmp_path / "out2"), "-q")
    assert "65 dimensions" in line and "x.weight" in line


@pytest.mark.parametrize("kind", ["outside-symlink", "dev-zero", "fifo", "too-big"])
def test_unsafe_tokenizer_file_is_not_copied(models, tmp_path, capsys, monkeypatch, kind):
    base, experts = models
    tok = base / "tokenizer.json"
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    if tok.exists() or tok.is_symlink():
        tok.unlink()
    if kind == "outside-symlink":
        tok.symlink_to(secret)
    elif kind == "dev-zero":
        tok.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(tok)
    else:
        import raymerge.engine.sidefiles as sidefiles

        tok.write_text("x" * 2000)
        monkeypatch.setattr(sidefiles, "SIDE_FILE_BYTES", 1000)
    _, line = _main(capsys, "run", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "-q")
    assert "tokenizer.json" in line and "--no-copy-tokenizer" in line
    assert not (tmp_path / "out").exists()
    if kind == "outside-symlink":  # the way out: leave the tokenizer behind
        from raymerge.cli import main

        assert (
            main(["run", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "-q", "--no-copy-tokenizer"])
            == 0
        )
        assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_hub_cache_symlinks_are_copied(models, tmp_path, capsys):
    """The Hugging Face cache links snapshot files into the repo's blobs/: that is inside the model."""
    base, experts = models
    repo = tmp_path / "hub" / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(base, snap)
    (repo / "blobs" / "f00d").write_text('{"version": "hub"}')
    (snap / "tokenizer.json").unlink(missing_ok=True)
    (snap / "tokenizer.json").symlink_to("../../blobs/f00d")
    from raymerge.cli import main

    assert main(["run", str(_recipe(tmp_path, snap, experts)), str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "hub"}'


def test_credentials_in_model_urls_never_reach_output_or_stderr(family, tmp_path, capsys):
    """A model URL with user:password: the merge reads with it, but the card, mergekit_config.yml,
    .raymerge/plan.json, stdout and every error line show it without the credentials."""
    from raymerge.cli import main

    from rangeserver import RangeServer

    base, experts = family
    with RangeServer(base.parent) as srv:
        authed = srv.url.replace("http://", "http://merger:s3cr3t-pw@")
        r = tmp_path / "r.yaml"
        r.write_text(
            recipe_text(
                "task_arithmetic",
                f"{authed}/{base.name}",
                [f"{authed}/{e.name}" for e in experts[:2]],
                None,
                [{"weight": 0.5}] * 2,
            )
        )
        assert main(["run", str(r), str(tmp_path / "out"), "-q"]) == 0
        assert main(["plan", str(r), "--json"]) == 0
        printed = capsys.readouterr()
        r.write_text(recipe_text("task_arithmetic", f"{authed}/nope", [f"{authed}/{experts[0].name}"], None, None))
        _, line = _main(capsys, "run", str(r), str(tmp_path / "out2"), "-q")
    assert "http://***@127.0.0.1" in line
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    assert {"README.md", "mergekit_config.yml", "plan.json"} <= {p.name for p in written}
    for text in [printed.out, printed.err, line, *(p.read_text() for p in written)]:
        assert "s3cr3t" not in text and "merger:" not in text
    assert "http://***@127.0.0.1" in (tmp_path / "out" / "README.md").read_text()


def test_unforeseen_exception_is_one_line_and_a_log_file(tmp_path, capsys, monkeypatch):
    """The last resort: an exception nothing anticipated is one line naming its type, and the
    traceback (credentials redacted) goes to a log file the line names."""
    import importlib
    import re
    import tempfile

    cli_main = importlib.import_module("raymerge.cli.main")  # the package's `main` attribute is the function

    def boom(name):
        raise RuntimeError("boom at https://u:pw@host/m")

    monkeypatch.setattr(cli_main, "describe_methods", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = cli_main.main(["methods"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 70 and len(lines) == 1, lines
    m = re.fullmatch(
        r"raymerge: error: internal error: RuntimeError: boom at https://\*\*\*@host/m "
        r"\(please report; traceback in (.+)\)",
        lines[0],
    )
    assert m, lines[0]
    log = Path(m.group(1))
    assert log.parent == tmp_path
    text = log.read_text()
    assert "Traceback" in text and "in boom" in text and "u:pw" not in text


@pytest.mark.parametrize(
    "key,value",
    [
        ("model_type", {}),
        ("num_hidden_layers", "x"),
        ("num_hidden_layers", -1),
        ("architectures", 5),
        ("vocab_size", []),
    ],
)
def test_config_values_of_the_wrong_type(models, tmp_path, capsys, key, value):
    import json

    base, experts = models
    cfg = experts[0] / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    _, line = _main(capsys, "run", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "-q")
    assert key in line and str(cfg) in line
