"""Staging, journal, resume (bit-identical), atomic publish, and loading through transformers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

import raymerge.engine.local as local_executor
from raymerge.engine.errors import OutputError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def _ties(family, **extra):
    base, experts = family
    return parse_recipe(
        recipe_text("ties", base, experts, {"density": 0.4}, [{"weight": 1.0}] * 3, extra="out_dtype: bfloat16")
    )


def test_interrupted_run_resumes_bit_identical(family, tmp_path, monkeypatch):
    recipe = _ties(family)
    merge(recipe, tmp_path / "clean", progress=False, out_shard_bytes=100_000)
    real = local_executor.run_task
    calls = {"n": 0}

    def flaky(task, staging_dir, device):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated crash")
        return real(task, staging_dir, device)

    monkeypatch.setattr(local_executor, "run_task", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(recipe, out, progress=False, out_shard_bytes=100_000, workers=1)
    assert not out.exists(), "a partial model must never appear at the output path"
    staging = tmp_path / "resumed.raymerge-staging"
    journal = (staging / ".raymerge" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 8
    # Corrupt one finished task's bytes: resume must notice (CRC) and redo it.
    first = json.loads(journal[0])
    plan_tasks = {t["id"] for t in map(json.loads, journal)}
    assert first["id"] in plan_tasks
    monkeypatch.setattr(local_executor, "run_task", real)
    shard = sorted(staging.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    figures = merge(recipe, out, progress=False, out_shard_bytes=100_000)
    assert 0 < figures.tasks_resumed < figures.tasks
    assert _digest(out) == _digest(tmp_path / "clean")
    assert not staging.exists()


def test_existing_output_is_refused_unless_overwrite(family, tmp_path):
    recipe = _ties(family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="already exists"):
        merge(recipe, out, progress=False)
    assert (out / "keep.txt").exists()
    merge(recipe, out, progress=False, overwrite=True)
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_output_metadata(family, tmp_path):
    recipe = _ties(family)
    out = tmp_path / "out"
    merge(recipe, out, progress=False, out_shard_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card and "wall_seconds" in card
    tensors = load_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    # mergekit's conventions: the recipe as run, and a card whose front matter lists the inputs.
    from raymerge.engine import __version__

    assert index["metadata"]["raymerge_version"] == __version__
    assert (out / "mergekit_config.yml").read_text() == recipe.source
    front = yaml.safe_load(card.split("---")[1])
    base, experts = family
    assert front["base_model"] == [str(base), *map(str, experts)] and front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers" and "merge" in front["tags"]


def test_tokenizer_files_are_copied_from_base(family, tmp_path):
    base, experts = family
    src = tmp_path / "base_with_tok"
    src.mkdir()
    for f in base.iterdir():
        (src / f.name).symlink_to(f)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    # without tokenizer_source the base's files are copied byte for byte (with it, the tokenizer is
    # rebuilt: tests/parity/test_tokenizer.py)
    recipe = parse_recipe(recipe_text("task_arithmetic", src, experts, None, [{"weight": 0.3}] * 3))
    merge(recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_transformers_loads_output_and_logits_match(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = family
    weights = [0.5, 0.3, 0.2]
    recipe = parse_recipe(
        recipe_text("task_arithmetic", base, experts, {"lambda": 0.9}, [{"weight": w} for w in weights])
    )
    out = tmp_path / "out"
    merge(recipe, out, progress=False, out_shard_bytes=120_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    # fp64 reference of the merge from the raw inputs
    b = load_dir(base)
    es = [load_dir(e) for e in experts]
    ref = {k: b[k].double() + 0.9 * sum(w * (e[k].double() - b[k].double()) for w, e in zip(weights, es)) for k in b}
    sd = model.state_dict()
    for k, v in ref.items():
        assert (sd[k].double() - v).abs().max() < 1e-6, k
    ref_model = transformers.LlamaForCausalLM(model.config).eval()
    ref_model.load_state_dict({k: v.float() for k, v in ref.items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = ref_model(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_verify_accepts_a_merge_and_names_a_corrupted_tensor(family, tmp_path):
    import subprocess
    import sys

    recipe = _ties(family)
    out = tmp_path / "out"
    merge(recipe, out, progress=False, out_shard_bytes=100_000)
    cli = [sys.executable, "-m", "raymerge.cli", "verify", str(out)]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 21 tensors"), ok.stderr
    receipts = json.loads((out / ".raymerge" / "receipts.json").read_text())
    victim = receipts[5]
    shard = out / victim["shard"]
    raw = bytearray(shard.read_bytes())
    raw[victim["offset"] + 1] ^= 0x10
    shard.write_bytes(bytes(raw))
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode != 0
    line = bad.stderr.strip()
    assert line.startswith("raymerge: error: checksum") and victim["tensor"] in line and victim["shard"] in line


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs made for the test (needs mount rights; skipped without them)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_output_larger_than_the_disk_fails_before_compute(family, small_fs):
    base, experts = family
    recipe = parse_recipe(
        recipe_text("task_arithmetic", base, experts, None, [{"weight": 1.0}] * 3, extra="out_dtype: float64")
    )
    big = small_fs / "big"
    with pytest.raises(OutputError, match="not enough disk space"):
        merge(recipe, big, progress=False)  # ~1.3 MB of float64 on a 1 MiB disk
    assert not big.exists()


def test_disk_full_at_publish_keeps_staging_and_resumes(family, small_fs, monkeypatch):
    from raymerge.engine.writer import Staging

    recipe = _ties(family)
    out = small_fs / "out"
    real = Staging._publish
    filler = small_fs / "filler"

    def fill_then_publish(self, receipts, card):
        with open(filler, "wb") as f:  # take every remaining byte of the disk
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        return real(self, receipts, card)

    monkeypatch.setattr(Staging, "_publish", fill_then_publish)
    with pytest.raises(OutputError, match="not enough disk space: the merge needs .* more, 0 bytes free"):
        merge(recipe, out, progress=False)
    assert not out.exists() and (small_fs / "out.raymerge-staging").exists()
    monkeypatch.setattr(Staging, "_publish", real)
    filler.unlink()
    figures = merge(recipe, out, progress=False)
    assert figures.tasks_resumed == figures.tasks
    ref = small_fs.parent / "ref"
    merge(recipe, ref, progress=False)
    assert _digest(out) == _digest(ref)


def test_tasks_round_trip_through_json(family, tmp_path):
    """A task is a self-contained serialisable spec: JSON out and back gives the same task."""
    from raymerge.engine.plan import TensorTask, build_plan

    base, experts = family
    files = []
    for i in range(3):  # include auxiliary inputs (RegMean's Grams) in the round trip
        from safetensors.torch import save_file

        mats = {
            k.removesuffix(".weight"): torch.eye(v.shape[1])
            for k, v in load_dir(base).items()
            if v.dim() == 2 and "embed" not in k and "lm_head" not in k
        }
        save_file(mats, str(tmp_path / f"g{i}.safetensors"))
        files.append({"grams": str(tmp_path / f"g{i}.safetensors")})
    for recipe in (_ties(family), parse_recipe(recipe_text("regmean", None, experts, None, files))):
        for task in build_plan(recipe).tasks:
            assert TensorTask.from_json(json.loads(json.dumps(task.to_json()))) == task


def test_output_that_is_or_contains_an_input_is_refused_even_with_overwrite(family, tmp_path):
    # --overwrite replaces the output directory: pointed at an input model (or a folder holding
    # one) it would delete the files the merge reads. Refused up front; the inputs stay intact.
    import shutil

    base, experts = family
    root = tmp_path / "models"
    shutil.copytree(base.parent, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    recipe = parse_recipe(
        recipe_text("task_arithmetic", root / base.name, [root / e.name for e in experts], None, [{"weight": 1.0}] * 3)
    )
    for out, what in (
        (root / experts[1].name, "is the input"),
        (root, "contains the input"),
        (root / ".." / root.name / base.name, "is the input"),
    ):
        with pytest.raises(OutputError, match=what):
            merge(recipe, out, overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not list(root.parent.glob("*.raymerge-staging"))
    merge(recipe, root / "merged", overwrite=True, progress=False)  # inside the folder, a new name: fine


# ------------------------------------------------------------------------------------------------
# ModelPublication: the one publisher merges, align and TACT fold write model directories through.


def _old_and_new(tmp_path, **kw):
    from raymerge.engine.publish import ModelPublication

    out = tmp_path / "model"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    pub = ModelPublication(out, overwrite=True, **kw)
    pub.check()
    (pub.start() / "new.txt").write_text("new")
    return out, pub


def test_publish_replaces_an_output_with_never_a_moment_without_one(tmp_path, monkeypatch):
    import os

    import raymerge.engine.publish as publish

    out, pub = _old_and_new(tmp_path)
    real_exchange, real_rename, seen = publish._exchange, os.rename, []

    def exchange(a, b):
        assert os.path.lexists(out)
        swapped = real_exchange(a, b)
        seen.append(("exchange", swapped, os.path.lexists(out)))
        return swapped

    def rename(src, dst):
        real_rename(src, dst)
        seen.append(("rename", os.path.basename(dst), os.path.lexists(out)))

    monkeypatch.setattr(publish, "_exchange", exchange)
    monkeypatch.setattr(os, "rename", rename)
    with pub:
        assert pub.publish() == str(out)
    assert seen[0] == ("exchange", True, True), "the new model is swapped in while the old one is still there"
    assert all(present for *_, present in seen), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging or old directory left"
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()


def test_publish_without_an_exchange_puts_the_old_output_back_if_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    import os

    import raymerge.engine.publish as publish

    out, pub = _old_and_new(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(pub.dir):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)  # e.g. a file system without RENAME_EXCHANGE
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"), pub:
        pub.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "old.txt").read_text() == "old"

    monkeypatch.setattr(os, "rename", real_rename)
    out, pub = _old_and_new(tmp_path / "again")
    with pub:
        pub.publish()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(os.listdir(out.parent)) == ["model"]


def test_publication_refuses_an_existing_output_and_cleans_up_after_a_failed_write(tmp_path):
    from raymerge.engine.errors import AlignmentError
    from raymerge.engine.publish import ModelPublication

    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(AlignmentError, match=f"output directory exists \\(file {out}\\); pass --overwrite"):
        ModelPublication(out, error=AlignmentError).check()
    with pytest.raises(AlignmentError, match="the output contains the input model"):
        ModelPublication(tmp_path, overwrite=True, error=AlignmentError).check([str(out / "in")])
    late = tmp_path / "late"
    with pytest.raises(RuntimeError, match="midway"), ModelPublication(late) as pub:
        pub.check()
        (pub.start() / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the half-written staging directory is gone"
    with pytest.raises(OutputError, match="output directory exists"), ModelPublication(late) as pub:
        pub.check()
        pub.start()
        late.mkdir()  # something appeared at the output while this one was being written
        pub.publish()
    assert not any(late.iterdir()) and not pub.dir.exists()
