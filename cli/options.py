"""Command-line options declared once: sizes, and the merge options that ``run`` and ``submit`` share.

``submit`` runs ``raymerge run`` on the cluster; it forwards every merge option the user set
(``forward``), so a new option of ``run`` reaches submitted jobs by being declared here alone.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raymerge.engine.plan import DEFAULT_SHARD_BYTES

_UNITS = {
    "": 1,
    "b": 10**9,  # mergekit's K/M/B suffixes (its --out-shard-size default is "5B", five billion)
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"2GiB"`` → 2147483648; plain integers are bytes; ``K``, ``M``, ``B`` (mergekit's habit) are
    thousands, millions and billions, so mergekit's ``--out-shard-size 5B`` means what it does there."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 2GiB, 5B, 1073741824)")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except OverflowError:
        raise argparse.ArgumentTypeError(f"size too large: {text!r}") from None


def positive_size(text: str) -> int:
    """``parse_size``, refusing zero (a budget or shard of 0 bytes is a mistake, not a default)."""
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return size


def positive_int(text: str) -> int:
    """A count of at least 1 (``--workers``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


@dataclass(frozen=True)
class Option:
    """One command-line option: its flag and ``add_argument`` keywords (``dest`` is derived)."""

    flag: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.flag, **self.kwargs)

    def as_args(self, value: Any) -> list[str]:
        """The flag (and value) that set ``value``; nothing for the default."""
        if value == self.kwargs.get("default") or value is None:
            return []
        if self.kwargs.get("action") == "store_true":
            return [self.flag] if value else []
        if self.kwargs.get("action") is argparse.BooleanOptionalAction:
            return [self.flag if value else "--no-" + self.flag.removeprefix("--")]
        return [self.flag, str(value)]


# Options of a merge that mean the same for `plan`, `run` and a submitted job.
PLAN_OPTIONS = (
    Option(
        "--out-shard-size",
        dict(type=positive_size, default=DEFAULT_SHARD_BYTES, help="bytes per output shard (default 5GiB)"),
    ),
    Option(
        "--memory-budget",
        dict(
            type=positive_size,
            default=None,
            help="host memory for running tasks, per node (default: half the available RAM)",
        ),
    ),
    Option(
        "--device",
        dict(
            choices=["auto", "cpu", "cuda"],
            default=None,
            help="compute device (default: the recipe's raymerge.device, auto); `plan --device cuda` plans for "
            "a machine with an accelerator, whether or not this one has it",
        ),
    ),
    Option(
        "--device-memory",
        dict(
            type=positive_size,
            default=None,
            help="memory of one accelerator (default: the first CUDA device's); tasks must fit it",
        ),
    ),
    Option(
        "--strict",
        dict(
            action="store_true",
            help="refuse recipe parameters the method does not use (mergekit, and raymerge by default, "
            "ignore them with a warning)",
        ),
    ),
    Option(
        "--allow-pickle",
        dict(
            action="store_true",
            help="read pytorch_model*.bin checkpoints with torch.load(weights_only=True) "
            "(same as `allow_pickle_bin: true` under `raymerge:`)",
        ),
    ),
)
RUN_OPTIONS = (
    *PLAN_OPTIONS,
    Option(
        "--intermediate-dir",
        dict(
            default=None,
            help="multi-stage recipes: where the named intermediate stages are written (default: OUT.stages)",
        ),
    ),
    Option(
        "--workers", dict(type=positive_int, default=None, help="concurrent tasks per node (default: min(4, cores))")
    ),
    Option("--overwrite", dict(action="store_true", help="replace an existing output directory")),
)


# mergekit-yaml's flags, so its command lines work on `raymerge run` (each help says what it maps to).
MERGEKIT_OPTIONS = (
    Option("--cuda", dict(action="store_true", help="mergekit's flag: the same as --device cuda")),
    Option(
        "--copy-tokenizer",
        dict(
            action=argparse.BooleanOptionalAction,
            default=True,
            help="write the tokenizer files of tokenizer_source (default; mergekit's flag)",
        ),
    ),
    Option(
        "--lazy-unpickle",
        dict(action="store_true", help="mergekit's flag; no effect: raymerge always reads lazily (see --allow-pickle)"),
    ),
    Option(
        "--allow-crimes",
        dict(
            action="store_true",
            help="mergekit's flag; no effect: raymerge merges any models whose tensors agree in names and shapes",
        ),
    ),
    Option(
        "--trust-remote-code",
        dict(action="store_true", help="mergekit's flag; no effect: merging never runs model code"),
    ),
)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        opt.add_to(parser)


def forward(args: argparse.Namespace, options: Sequence[Option]) -> list[str]:
    """The command-line arguments that reproduce the values ``args`` holds for ``options``."""
    return [a for opt in options for a in opt.as_args(getattr(args, opt.dest))]


__all__ = [
    "MERGEKIT_OPTIONS",
    "PLAN_OPTIONS",
    "RUN_OPTIONS",
    "Option",
    "add_options",
    "forward",
    "parse_size",
    "positive_int",
    "positive_size",
]
