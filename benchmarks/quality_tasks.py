"""Synthetic sequence-classification tasks for the merge-quality benchmark.

Each task draws sequences from its own *domain* — a seeded subset of the vocabulary whose filler
tokens follow a sticky Markov chain (so masked-token pretraining has structure to learn) — and
plants a few reserved "special" tokens whose *positions or order* decide the label. Labels never
follow from which tokens occur alone, so a linear probe on the frozen encoder's mean-pooled
features stays near chance while a fully fine-tuned expert learns the task: the merge table has
room to tell methods apart.

Vocabulary: ``PAD`` = 0, ``MASK`` = 1, content tokens ``FIRST_CONTENT`` … ``VOCAB - 1``. Every
sequence is ``SEQ_LEN`` content tokens (no padding, no special tokens), so an attention mask of
ones fits every batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 60  # not a layer width: raymerge treats 2-D tensors with vocab_size rows as embeddings
PAD, MASK = 0, 1
FIRST_CONTENT = 2
SEQ_LEN = 32
CONTENT = torch.arange(FIRST_CONTENT, VOCAB)
N_SPECIAL = 8  # reserved tokens per domain that tasks plant; the rest are Markov fillers

Sampler = Callable[["TaskDomain", int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TaskDomain:
    """A task's input domain: ``specials`` (planted by the task) and ``fillers``.

    Fillers follow a seeded successor map ``succ`` with probability ``stickiness`` and are drawn
    uniformly otherwise.
    """

    specials: torch.Tensor
    fillers: torch.Tensor
    succ: torch.Tensor  # succ[i] = index (into fillers) of the preferred successor of fillers[i]
    stickiness: float = 0.6

    def background(self, n: int, g: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
        """``n`` filler sequences (token ids, n × length)."""
        return self.fillers[markov_indices(self.succ.expand(n, -1), n, length, self.stickiness, g)]


def markov_indices(succ: torch.Tensor, n: int, length: int, stickiness: float, g: torch.Generator) -> torch.Tensor:
    """Index sequences where each step follows row r's successor map ``succ[r]`` with
    probability ``stickiness`` and is uniform otherwise."""
    k = succ.shape[1]
    idx = torch.empty(n, length, dtype=torch.long)
    idx[:, 0] = torch.randint(k, (n,), generator=g)
    stick = torch.rand(n, length, generator=g) < stickiness
    fresh = torch.randint(k, (n, length), generator=g)
    rows = torch.arange(n)
    for i in range(1, length):
        idx[:, i] = torch.where(stick[:, i], succ[rows, idx[:, i - 1]], fresh[:, i])
    return idx


def make_domain(seed: int, size: int = 40) -> TaskDomain:
    g = torch.Generator().manual_seed(seed)
    tokens = CONTENT[torch.randperm(len(CONTENT), generator=g)[:size]]
    fillers = tokens[N_SPECIAL:].sort().values
    return TaskDomain(specials=tokens[:N_SPECIAL], fillers=fillers, succ=torch.randperm(len(fillers), generator=g))


def _labels(n: int, classes: int, g: torch.Generator) -> torch.Tensor:
    """Balanced labels in random order."""
    return torch.randperm(n, generator=g) % classes


def _distinct_positions(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct random positions per row (n × k)."""
    return torch.rand(n, SEQ_LEN, generator=g).argsort(dim=1)[:, :k]


# --- tasks -----------------------------------------------------------------------------------------
# Each sampler returns (input_ids n × SEQ_LEN int64, labels n int64) with balanced classes.


def marker_position(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: the quarter of the sequence in which the single marker token sits."""
    y = _labels(n, 4, g)
    x = d.background(n, g)
    q = SEQ_LEN // 4
    x[torch.arange(n), y * q + torch.randint(q, (n,), generator=g)] = d.specials[0]
    return x, y


def token_order(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: does token a come before token b? Each occurs exactly once."""
    y = _labels(n, 2, g)
    x = d.background(n, g)
    pos = _distinct_positions(n, 2, g)
    lo, hi = pos.min(1).values, pos.max(1).values
    rows = torch.arange(n)
    x[rows, torch.where(y == 1, lo, hi)] = d.specials[1]
    x[rows, torch.where(y == 1, hi, lo)] = d.specials[2]
    return x, y


_PERMS3 = torch.tensor(list(itertools.permutations(range(3))))


def triple_order(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """6 classes: the order in which tokens a, b and c (each once) appear."""
    y = _labels(n, 6, g)
    x = d.background(n, g)
    pos = _distinct_positions(n, 3, g).sort(dim=1).values
    rows = torch.arange(n)
    for slot in range(3):
        x[rows, pos[:, slot]] = d.specials[3:6][_PERMS3[y, slot]]
    return x, y


def bracket_balance(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: are the opener/closer tokens balanced (no prefix with more closers than
    openers)? Both classes hold 6 openers and 6 closers."""
    pairs = 6
    y = _labels(n, 2, g)
    x = d.background(n, g)
    # Rejection-sample bracket strings per class, in vectorised rounds.
    seqs = torch.empty(n, 2 * pairs, dtype=torch.bool)
    todo = torch.ones(n, dtype=torch.bool)
    while bool(todo.any()):
        m = int(todo.sum())
        cand = torch.rand(m, 2 * pairs, generator=g).argsort(dim=1) < pairs  # True = opener
        ok = (torch.cumsum(cand.long() * 2 - 1, dim=1) >= 0).all(dim=1) == y[todo].bool()
        rows = torch.nonzero(todo).flatten()[ok]
        seqs[rows] = cand[ok]
        todo[rows] = False
    pos = _distinct_positions(n, 2 * pairs, g).sort(dim=1).values
    x.scatter_(1, pos, torch.where(seqs, d.specials[0], d.specials[1]))
    return x, y


def presence_xor(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: exactly one of tokens a and b occurs (1) versus both or neither (0). Present
    tokens occur one to three times."""
    y = _labels(n, 2, g)
    case = torch.randint(2, (n,), generator=g)
    has_a = torch.where(y == 1, case, case)
    has_b = torch.where(y == 1, 1 - case, case)
    x = d.background(n, g)
    pos = _distinct_positions(n, 6, g)
    count_a = torch.randint(1, 4, (n,), generator=g)
    count_b = torch.randint(1, 4, (n,), generator=g)
    slot = torch.arange(3)
    put_a = (slot[None] < count_a[:, None]) & has_a[:, None].bool()
    put_b = (slot[None] < count_b[:, None]) & has_b[:, None].bool()
    rows = torch.arange(n)[:, None].expand(-1, 3)
    x[rows[put_a], pos[:, :3][put_a]] = d.specials[6]
    x[rows[put_b], pos[:, 3:][put_b]] = d.specials[7]
    return x, y


def marker_gap(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: are the two copies of the marker close (gap 1–5) or far (gap 10–20)?"""
    y = _labels(n, 2, g)
    x = d.background(n, g)
    gap = torch.where(y == 1, torch.randint(1, 6, (n,), generator=g), torch.randint(10, 21, (n,), generator=g))
    start = (torch.rand(n, generator=g) * (SEQ_LEN - gap)).long()
    rows = torch.arange(n)
    x[rows, start] = d.specials[2]
    x[rows, start + gap] = d.specials[2]
    return x, y


def first_group(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: which quarter of the filler vocabulary the *first* token belongs to."""
    y = _labels(n, 4, g)
    x = d.background(n, g)
    k = len(d.fillers) // 4
    x[:, 0] = d.fillers[y * k + torch.randint(k, (n,), generator=g)]
    return x, y


def markov_source(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: which of two successor maps generated the fillers. Both give the same uniform
    unigram distribution, so only bigram statistics tell them apart."""
    y = _labels(n, 2, g)
    k = len(d.fillers)
    gm = torch.Generator().manual_seed(int(d.fillers.sum()))
    maps = torch.stack([torch.randperm(k, generator=gm) for _ in range(2)])
    return d.fillers[markov_indices(maps[y], n, SEQ_LEN, 0.8, g)], y


def bigram_presence(d: TaskDomain, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes: does token a occur immediately before token b? Both occur twice in every
    sequence; negatives never have a directly followed by b."""
    y = _labels(n, 2, g)
    x = d.background(n, g)
    pos = torch.empty(n, 4, dtype=torch.long)
    todo = torch.ones(n, dtype=torch.bool)
    while bool(todo.any()):
        m = int(todo.sum())
        cand = _distinct_positions(m, 4, g)
        adjacent = ((cand[:, None, 2:] - cand[:, :2, None]) == 1).flatten(1).any(dim=1)
        ok = adjacent == y[todo].bool()
        rows = torch.nonzero(todo).flatten()[ok]
        pos[rows] = cand[ok]
        todo[rows] = False
    x.scatter_(1, pos[:, :2], d.specials[3].expand(n, 2).contiguous())
    x.scatter_(1, pos[:, 2:], d.specials[4].expand(n, 2).contiguous())
    return x, y


@dataclass(frozen=True)
class Task:
    """One benchmark task: a name, its label function, number of classes and input domain."""

    name: str
    sampler: Sampler
    classes: int
    domain: TaskDomain

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labelled examples (input_ids n × SEQ_LEN int64, labels n int64)."""
        return self.sampler(self.domain, n, g)

    def inputs(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` unlabelled inputs from the task's distribution (pretraining, calibration)."""
        return self.sample(n, g)[0]


SAMPLERS: dict[str, tuple[Sampler, int]] = {
    "marker_position": (marker_position, 4),
    "token_order": (token_order, 2),
    "triple_order": (triple_order, 6),
    "bracket_balance": (bracket_balance, 2),
    "presence_xor": (presence_xor, 2),
    "marker_gap": (marker_gap, 2),
    "first_group": (first_group, 4),
    "markov_source": (markov_source, 2),
    "bigram_presence": (bigram_presence, 2),
}


def make_tasks(names: list[str] | tuple[str, ...]) -> list[Task]:
    """The named tasks, each with its own seeded domain (seed from its position in ``SAMPLERS``)."""
    order = list(SAMPLERS)
    out = []
    for name in names:
        sampler, classes = SAMPLERS[name]
        out.append(Task(name, sampler, classes, make_domain(seed=100 + order.index(name))))
    return out
