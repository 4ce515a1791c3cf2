"""Multi-stage recipes: several YAML documents in one file, later ones merging earlier ones' outputs.

Two forms exist among mergekit users, and both are read here:

* ``mergekit-multi`` (mergekit 0.1.5): each intermediate document has a ``name``; a later
  document names it where a model goes (``model: my-slerp``, ``base_model: my-slerp``, also with
  a ``+lora`` suffix); intermediates are written to ``<intermediate dir>/<name>``; the one
  document without a ``name`` is the final merge.
* ``mergekit-mega`` (older): each document has an ``out_path`` where it is written, and later
  documents refer to that path.

``stage_order`` checks the documents (unique names, one final merge, no cycles), puts every
stage after the stages it reads, and rewrites the references to where those stages are written.
The final merge is the document without a ``name`` or ``out_path``, else the one no other stage
reads; it goes to the run's output directory. A stage whose output directory already holds a
model (``config.json`` and weights) is reused unless the run overwrites, as ``mergekit-multi``
does by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raymerge.engine.errors import RecipeError
from raymerge.engine.safeio import load_yaml_documents

# A stage's output is complete when it has these (as mergekit-multi checks).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe: its YAML with references to earlier stages
    rewritten, where it is written (None: the run's output), and how other stages name it."""

    text: str
    label: str
    dest: str | None
    reads: tuple[str, ...] = ()  # where the stages it reads are written

    @property
    def final(self) -> bool:
        return self.dest is None

    def origin(self, recipe: str | os.PathLike[str]) -> str:
        """How errors name this stage of the recipe file ``recipe``."""
        return f"{recipe} (stage {self.label!r})"


def documents(text: str, origin: str) -> list[Any]:
    """The recipe's YAML documents (one for an ordinary recipe), empty ones dropped."""
    return [d for d in load_yaml_documents(text, file=origin, error=RecipeError, what="recipe") if d is not None]


def is_multi_stage(text: str, origin: str = "<recipe>") -> bool:
    return len(documents(text, origin)) > 1


def _model_part(ref: str) -> tuple[str, str]:
    """``path+lora`` → (path, "+lora"): a model reference's path and the rest."""
    head, sep, tail = ref.partition("+")
    return head, sep + tail


def _rewrite(node: Any, targets: dict[str, str], used: set[str]) -> Any:
    """``node`` with every string whose model path is a key of ``targets`` pointed at its value."""
    if isinstance(node, dict):
        return {k: _rewrite(v, targets, used) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, targets, used) for v in node]
    if isinstance(node, str):
        path, rest = _model_part(node)
        key = _key(path)
        if key in targets:
            used.add(key)
            return targets[key] + rest
    return node


def _key(path: str) -> str:
    """How a reference is matched: names as written, local paths normalised."""
    if "://" in path:
        return path
    return os.path.normpath(path)


def stage_order(text: str, origin: str, intermediate_dir: str | os.PathLike[str]) -> list[Stage]:
    """The stages of a multi-stage recipe in an order that runs every stage after those it reads,
    the final merge last; each stage's text has its references to other stages rewritten."""
    docs = documents(text, origin)
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RecipeError(f"document {i + 1} of the recipe is not a YAML mapping", file=origin)
    labels: list[str] = []
    keys: list[str | None] = []  # how other stages refer to each one (None: it has no name or path)
    targets: dict[str, str] = {}  # key → where that stage is written
    for i, doc in enumerate(docs):
        name, out_path = doc.pop("name", None), doc.pop("out_path", None)
        for field, value in (("name", name), ("out_path", out_path)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RecipeError(f"document {i + 1}: `{field}` must be a non-empty string, got {value!r}", file=origin)
        if name is not None and ("/" in name or name in (".", "..")):
            raise RecipeError(f"document {i + 1}: stage name {name!r} must not be a path", file=origin)
        ref = name if name is not None else out_path
        key = None if ref is None else _key(ref)
        if key is not None:
            if key in targets:
                raise RecipeError(f"two stages are called {ref!r}", file=origin, hint="give each stage its own name")
            targets[key] = str(Path(intermediate_dir) / name) if name is not None else ref
        labels.append(ref if ref is not None else "final merge")
        keys.append(key)
    reads: list[set[str]] = []
    rewritten = []
    for doc in docs:
        used: set[str] = set()
        rewritten.append(_rewrite(doc, targets, used))
        reads.append(used)
    final = _final_stage(keys, reads, labels, origin)
    stages = []
    for i in _topological(keys, reads, labels, origin):
        key = keys[i]
        dest = None if i == final or key is None else targets[key]
        text_i = yaml.safe_dump(rewritten[i], sort_keys=False)
        stages.append(Stage(text_i, labels[i], dest, tuple(sorted(targets[k] for k in reads[i]))))
    return [s for s in stages if not s.final] + [s for s in stages if s.final]


def _final_stage(keys: list[str | None], reads: list[set[str]], labels: list[str], origin: str) -> int:
    """The index of the final merge: the document without a name or out_path, else the one
    stage no other stage reads."""
    unnamed = [i for i, k in enumerate(keys) if k is None]
    if len(unnamed) > 1:
        raise RecipeError(
            f"{len(unnamed)} documents have neither `name` nor `out_path`; only the final merge may",
            file=origin,
            hint="name every intermediate stage (`name: ...`) and refer to it by that name",
        )
    if unnamed:
        return unnamed[0]
    read_by_any = set().union(*reads)
    sinks = [i for i, k in enumerate(keys) if k not in read_by_any]
    if len(sinks) != 1:
        names = ", ".join(repr(labels[i]) for i in sinks) or "none"
        raise RecipeError(
            f"cannot tell which stage is the final merge: stages no other stage reads: {names}",
            file=origin,
            hint="leave `name` off the final document",
        )
    return sinks[0]


def _topological(keys: list[str | None], reads: list[set[str]], labels: list[str], origin: str) -> list[int]:
    """Document indices, each after the stages it reads (document order among independent ones)."""
    index = {k: i for i, k in enumerate(keys) if k is not None}
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, path: list[int]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            cycle = " -> ".join(repr(labels[j]) for j in [*path[path.index(i) :], i])
            raise RecipeError(f"the recipe's stages read each other in a cycle: {cycle}", file=origin)
        state[i] = "open"
        for key in sorted(reads[i], key=lambda k: index[k]):
            visit(index[key], [*path, i])
        state[i] = "done"
        order.append(i)

    for i in range(len(keys)):
        visit(i, [])
    return order


def stage_done(dest: str) -> bool:
    """Whether ``dest`` already holds a model (``config.json`` and weights), as mergekit-multi
    decides to skip a stage."""
    return os.path.isfile(os.path.join(dest, "config.json")) and any(
        os.path.exists(os.path.join(dest, f)) for f in WEIGHT_FILES
    )


__all__ = ["Stage", "documents", "is_multi_stage", "stage_done", "stage_order"]
