"""``tokenizer_source`` and the ``tokenizer:`` section: raymerge run and mergekit-yaml (0.1.5) on
the same fp32 tiny Llamas whose vocabularies differ (other words, other orders, an added token,
an embedding padded past its tokenizer) must give the same output tokenizer and, token by token,
the same embedding and LM-head rows (1e-6), the same padding rows and the same other tensors.

mergekit orders the models it takes tokens from as a Python set when there is no base, so rows are
compared by token, not by id; every case here has a base, whose tokens come first in both.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hf_tiny import WORDS, write_tokenizer

from raymerge.cli import main as raymerge_main
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, mergekit_yaml

transformers = pytest.importorskip("transformers")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _model(path: Path, words: list[str], rows: int, seed: int, added: tuple[str, ...] = (), tied: bool = False) -> Path:
    """A 2-block Llama over a word-level tokenizer ([PAD], [UNK], [BOS], ``words``, ``added``)
    whose embedding has ``rows`` rows (more than the tokens: a padded vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert 3 + len(words) + len(added) <= rows
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        initializer_range=0.3,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    write_tokenizer(path, words, added)
    return path


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory) -> tuple[Path, Path, Path]:
    """base: 20 words, 23 tokens in 24 rows; e1: other words in another order plus an added
    ``<|im_start|>``, exact rows; e2: the base's words reversed, 32 rows."""
    root = tmp_path_factory.mktemp("vocab")
    words = list(WORDS)
    other = words[6:28]
    random.Random(1).shuffle(other)
    base = _model(root / "base", words[:20], 24, seed=0)
    e1 = _model(root / "e1", other, 3 + len(other) + 1, seed=1, added=("<|im_start|>",))
    e2 = _model(root / "e2", words[:20][::-1], 32, seed=2)
    return base, e1, e2


def _recipes(b: Path, e1: Path, e2: Path) -> dict[str, str]:
    models = (
        f"models:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {e1}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {e2}\n    parameters: {{weight: [0.2, 0.6]}}\n"
    )
    weighted = (
        f"models:\n  - model: {b}\n  - model: {e1}\n    parameters: {{weight: 0.7, density: 0.6}}\n"
        f"  - model: {e2}\n    parameters: {{weight: 0.4, density: 0.8}}\n"
    )
    return {
        "union_linear": f"merge_method: linear\nbase_model: {b}\ntokenizer_source: union\n{models}",
        "padded_linear_chunked": (
            f"merge_method: linear\nbase_model: {b}\n{models}tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n"
        ),
        "base_task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {b}\ntokenizer_source: base\n{weighted}",
        "model_source_ties": f"merge_method: ties\nbase_model: {b}\ntokenizer_source: {e1}\n{weighted}",
        "tokens_section": (
            f"merge_method: ties\nbase_model: {b}\n{weighted}parameters: {{normalize: true}}\ntokenizer:\n"
            "  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
            f"    <|im_start|>:\n      source: {e1}\n"
            "    '[BOS]':\n      source: {kind: zero}\n      force: true\n"
            f"    cat:\n      source: {e2}\n      force: true\n"
            f"    brandnew:\n      source: {{kind: model_token, model: {b}, token: dog}}\n"
            f"    another:\n      source: {{kind: model_token, model: {e1}, token_id: 5}}\n"
        ),
    }


def _vocab(out: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()


@pytest.mark.parametrize("case", sorted(_recipes(Path("b"), Path("e1"), Path("e2"))))
def test_tokenizer_recipes_match_mergekit(case, vocab_family, tmp_path):
    text = _recipes(*vocab_family)[case] + "dtype: float32\n"
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(text, mk_out, copy_tokenizer=True)
    recipe = tmp_path / "recipe.yaml"
    # 4 rows per task: token rows, default rows and the padding rows' mean cross task boundaries
    recipe.write_text(text + ("raymerge: {chunk_bytes: 256}\n" if "chunked" in case else ""))
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(got) == set(ref)
    mk_vocab, rm_vocab = _vocab(mk_out), _vocab(rm_out)
    assert mk_vocab == rm_vocab or set(mk_vocab) == set(rm_vocab)
    cfg = [json.loads((o / "config.json").read_text())["vocab_size"] for o in (mk_out, rm_out)]
    assert cfg[0] == cfg[1] == ref["lm_head.weight"].shape[0] == got["lm_head.weight"].shape[0]
    for name in ref:
        a, b = ref[name].double(), got[name].double()
        if name in VOCAB_TENSORS:
            assert a.shape == b.shape
            ids = sorted(mk_vocab.items())
            a_rows = torch.stack([a[i] for _, i in ids])
            b_rows = torch.stack([b[rm_vocab[t]] for t, _ in ids])
            diff = (a_rows - b_rows).abs().max().item()
            assert diff <= 1e-6, f"{case}: {name} token rows differ by {diff:.3g}"
            pad = (a[len(ids) :] - b[len(ids) :]).abs().max().item() if a.shape[0] > len(ids) else 0.0
            assert pad <= 1e-6, f"{case}: {name} padding rows differ by {pad:.3g}"
        else:
            assert (a - b).abs().max().item() <= 1e-6, f"{case}: {name}"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(rm_out), torch_dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(str(rm_out))("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_tied_embeddings_stay_tied(tmp_path):
    """Tied models (no lm_head tensor) merged over a union vocabulary: the output has no lm_head,
    keeps the tie, matches mergekit's embedding token by token, and its logits use the merged table."""
    words = list(WORDS)
    base = _model(tmp_path / "tb", words[:12], 16, seed=3, tied=True)
    other = _model(tmp_path / "to", words[4:18], 17, seed=4, tied=True)
    text = (
        f"merge_method: linear\nbase_model: {base}\ntokenizer_source: union\ndtype: float32\n"
        f"models:\n  - model: {base}\n    parameters: {{weight: 0.6}}\n  - model: {other}\n    parameters: {{weight: 0.4}}\n"
    )
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(text, mk_out, copy_tokenizer=True)
    (tmp_path / "r.yaml").write_text(text)
    assert raymerge_main(["run", str(tmp_path / "r.yaml"), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert "lm_head.weight" not in got and set(got) == set(ref)
    assert json.loads((rm_out / "config.json").read_text())["tie_word_embeddings"] is True
    mk_vocab, rm_vocab = _vocab(mk_out), _vocab(rm_out)
    assert set(mk_vocab) == set(rm_vocab) and len(rm_vocab) == 3 + 18
    emb = "model.embed_tokens.weight"
    for t, i in mk_vocab.items():
        assert (ref[emb][i] - got[emb][rm_vocab[t]]).abs().max().item() <= 1e-6, t
    model = transformers.AutoModelForCausalLM.from_pretrained(str(rm_out), torch_dtype=torch.float32)
    assert torch.equal(model.lm_head.weight.detach(), got[emb])


def test_vocab_tasks_gather_their_own_rows(vocab_family):
    """Row-chunked tasks of a re-indexed embedding carry the row map of their rows only; the one
    padding tasks map every token row (for their mean); no task reads a whole other tensor."""
    base, e1, e2 = vocab_family
    text = (
        f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {e1}\n    parameters: {{weight: 1}}\ntokenizer: {{source: union, pad_to_multiple_of: 24}}\n"
        "raymerge: {chunk_bytes: 320}\n"
    )
    plan = build_plan(parse_recipe(text))
    v = 3 + 20 + 8 + 1  # the base's 23 tokens, e1's 8 new words, <|im_start|>
    assert plan.config["vocab_size"] == 48 and plan.tokenizer_from is None and "tokenizer.json" in plan.tokenizer_files
    emb = [t for t in plan.tasks if t.tensor == "model.embed_tokens.weight"]
    spans = [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 32), (32, 35), (35, 40), (40, 45), (45, 48)]
    assert [(t.row_start, t.row_end) for t in emb] == spans  # 5 rows a task, cut where padding starts
    for t in emb:
        assert t.vocab_size == v and len(t.vocab_rows) == 2
        want = v if t.row_end > v else t.row_end - t.row_start
        assert all(len(rows) == want for rows in t.vocab_rows)
    base_rows = emb[0].vocab_rows[0]
    assert base_rows == (0, 1, 2, 3, 4)  # the base's tokens keep their ids
    last = emb[5]  # rows 25-29, e1's new words: the base has no row, so its default is e1's row (one donor)
    assert all(r < 0 for r in last.vocab_rows[0]) and all(r >= 0 for r in last.vocab_rows[1])
    assert [len(d) for d in last.vocab_defaults] == [1] * len(last.vocab_defaults)


def test_different_vocabularies_need_a_tokenizer_source(vocab_family):
    from raymerge.engine.errors import CheckpointError

    base, e1, _ = vocab_family
    text = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n  - model: {e1}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(CheckpointError, match="tokenizer_source: union"):
        build_plan(parse_recipe(text))


def test_sliced_recipe_with_union_vocabulary_matches_mergekit(vocab_family, tmp_path):
    """Slices over models whose vocabularies differ: the embedding is re-indexed over the first
    slice's sources and the LM head over the last's, as mergekit does."""
    base, e1, e2 = vocab_family
    src = "      - model: {m}\n        layer_range: [{a}, {b}]\n"
    text = (
        f"merge_method: linear\ntokenizer_source: union\nbase_model: {base}\ndtype: float32\nslices:\n"
        f"  - sources:\n{src.format(m=base, a=0, b=2)}{src.format(m=e1, a=0, b=2)}"
        "    parameters: {weight: [0.2, 0.8]}\n"
        f"  - sources:\n{src.format(m=e2, a=1, b=2)}{src.format(m=base, a=1, b=2)}"
        "    parameters: {weight: 0.5}\n"
    )
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(text, mk_out, copy_tokenizer=True)
    (tmp_path / "r.yaml").write_text(text)
    assert raymerge_main(["run", str(tmp_path / "r.yaml"), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(ref) == set(got) and sum(k.endswith("mlp.up_proj.weight") for k in got) == 3
    mk_vocab, rm_vocab = _vocab(mk_out), _vocab(rm_out)
    assert set(mk_vocab) == set(rm_vocab)
    for name in ref:
        if name in VOCAB_TENSORS:
            rows = [(ref[name][i] - got[name][rm_vocab[t]]).abs().max().item() for t, i in mk_vocab.items()]
            assert max(rows) <= 1e-6, name
        else:
            assert (ref[name] - got[name]).abs().max().item() <= 1e-6, name


def test_vocab_and_lora_fields_survive_the_task_wire_format(vocab_family):
    from raymerge.engine.plan import TensorTask

    base, e1, _ = vocab_family
    text = (
        f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {e1}\n    parameters: {{weight: 1}}\ntokenizer: {{source: union, pad_to_multiple_of: 24}}\n"
    )
    plan = build_plan(parse_recipe(text))
    tasks = [t for t in plan.tasks if t.vocab_size]
    assert tasks and any(t.vocab_defaults for t in tasks)
    for t in tasks:
        assert TensorTask.from_json(json.loads(json.dumps(t.to_json()))) == t


@pytest.mark.parametrize(
    "tokens,match",
    [
        ("{foo: {source: {kind: model_token, model: M}}}", "exactly one of `token` and `token_id`"),
        ("{foo: {source: {kind: zeros}}}", "kind"),
        ("{foo: {source: ./nowhere}}", "'./nowhere' is not one of the models"),
        ("{foo: {sorce: M}}", "sorce"),
    ],
)
def test_bad_token_sources_are_one_clear_error(tokens, match, vocab_family):
    from raymerge.engine.errors import RecipeError

    base = vocab_family[0]
    text = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\ntokenizer: {{tokens: {tokens}}}\n"
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text.replace("M", str(base)))


def test_model_without_a_tokenizer_is_one_error_line(family, tmp_path, capsys):
    """Synthetic models ship no tokenizer: building one is refused in one line, nothing is written."""
    base, experts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {experts[0]}\n    parameters: {{weight: 1}}\n"
    )
    assert raymerge_main(["run", str(recipe), str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raymerge: error: cannot load the tokenizer") and str(base) in err[0]
    assert not (tmp_path / "out").exists()


def _bpe_model(path: Path, rows: int, seed: int) -> Path:
    """A Llama over a small BPE tokenizer (9 tokens: [UNK], a–d, ab, cd, then x and y, which no
    merge makes) with ``rows`` embedding rows: fewer rows than tokens leaves x and y without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4, "ab": 5, "cd": 6, "x": 7, "y": 8}
    merges = [("a", "b"), ("c", "d")]
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


def test_tokens_past_the_base_rows_are_dropped_then_taken_from_others(tmp_path):
    """A base whose embedding stops before its BPE tokenizer does (7 rows, 9 tokens): its tokenizer
    is stripped of x and y, then the union takes them from the other model, whose rows they get —
    as mergekit does."""
    base = _bpe_model(tmp_path / "b", 7, seed=0)
    other = _bpe_model(tmp_path / "o", 9, seed=1)
    text = (
        f"merge_method: linear\nbase_model: {base}\ntokenizer_source: union\ndtype: float32\nmodels:\n"
        f"  - model: {base}\n    parameters: {{weight: 0.3}}\n  - model: {other}\n    parameters: {{weight: 0.7}}\n"
    )
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(text, mk_out, copy_tokenizer=True)
    (tmp_path / "r.yaml").write_text(text)
    assert raymerge_main(["run", str(tmp_path / "r.yaml"), str(rm_out), "-q"]) == 0
    mk_vocab, rm_vocab = _vocab(mk_out), _vocab(rm_out)
    assert set(mk_vocab) == set(rm_vocab) and len(rm_vocab) == 9
    assert [rm_vocab[t] for t in ("x", "y")] == [7, 8]  # new tokens in the donor's id order
    ref, got, o = load_dir(mk_out), load_dir(rm_out), load_dir(other)
    for name in ref:
        if name in VOCAB_TENSORS:
            rows = [(ref[name][i] - got[name][rm_vocab[t]]).abs().max().item() for t, i in mk_vocab.items()]
            assert max(rows) <= 1e-6, name
        else:
            assert (ref[name] - got[name]).abs().max().item() <= 1e-6, name
    emb = "model.embed_tokens.weight"
    assert torch.equal(got[emb][rm_vocab["y"]], o[emb][8])  # one donor: the other model's row as is
