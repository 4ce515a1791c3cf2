"""Eight text-classification tasks for the real-model quality suite, built from English words.

Every example is ``[CLS] w1 … w10 [SEP]`` (12 token ids, no padding), each word a single
WordPiece of the model's own uncased vocabulary, so the pretrained encoder's knowledge of the
words (what a country is, which number is larger, which adjective is positive) is usable. The
tasks ask different things of the same kind of input — semantics, world knowledge, numeracy,
word order, copying, counting — so that each expert moves the backbone in its own direction.
Labels are balanced by construction; every split is drawn from its own seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = 10  # content positions per example; with [CLS] and [SEP] the sequence is 12 tokens
SEQ_LEN = WORDS + 2

FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "on",
    "with",
    "for",
    "at",
    "by",
    "from",
    "it",
    "this",
    "that",
    "is",
    "was",
    "very",
    "so",
    "then",
]
ANIMALS = [
    "dog",
    "cat",
    "horse",
    "cow",
    "pig",
    "sheep",
    "lion",
    "tiger",
    "bear",
    "wolf",
    "fox",
    "rabbit",
    "mouse",
    "bird",
    "fish",
    "duck",
    "goat",
    "deer",
    "monkey",
    "snake",
]
COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "brown",
    "pink",
    "purple",
    "orange",
    "gray",
    "gold",
    "silver",
]
FOODS = [
    "bread",
    "cheese",
    "apple",
    "rice",
    "soup",
    "meat",
    "cake",
    "milk",
    "coffee",
    "tea",
    "sugar",
    "salt",
    "butter",
    "egg",
    "pizza",
]
EUROPE = [
    "france",
    "germany",
    "italy",
    "spain",
    "poland",
    "sweden",
    "norway",
    "greece",
    "portugal",
    "ireland",
    "austria",
    "belgium",
]
ASIA = [
    "china",
    "india",
    "japan",
    "korea",
    "vietnam",
    "thailand",
    "pakistan",
    "iran",
    "iraq",
    "nepal",
    "indonesia",
    "malaysia",
]
AMERICAS = [
    "canada",
    "mexico",
    "brazil",
    "argentina",
    "chile",
    "peru",
    "cuba",
    "colombia",
    "venezuela",
    "jamaica",
    "ecuador",
    "bolivia",
]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
POSITIVE = [
    "good",
    "great",
    "happy",
    "wonderful",
    "excellent",
    "nice",
    "lovely",
    "beautiful",
    "perfect",
    "fine",
    "pleasant",
    "brilliant",
]
NEGATIVE = [
    "bad",
    "terrible",
    "sad",
    "awful",
    "horrible",
    "poor",
    "ugly",
    "wrong",
    "nasty",
    "boring",
    "dreadful",
    "miserable",
]
CATEGORIES = (ANIMALS, COLORS, FOODS, EUROPE + ASIA + AMERICAS)
ALL_WORDS = sorted(
    {*FILLER, *ANIMALS, *COLORS, *FOODS, *EUROPE, *ASIA, *AMERICAS, *NUMBERS, *POSITIVE, *NEGATIVE, "not"}
)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Vocab:
    """Word → token id, from a WordPiece ``vocab.txt`` (one token a line, id = line number)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.ids = {t: i for i, t in enumerate(tokens)}
        missing = [w for w in (*SPECIALS[1:4], *ALL_WORDS) if w not in self.ids]
        if missing:
            raise ValueError(f"vocabulary lacks single-token entries for {missing}")
        self.size = len(tokens)

    @classmethod
    def from_file(cls, path: Path) -> Vocab:
        return cls(path.read_text(encoding="utf-8").splitlines())

    @classmethod
    def tiny(cls) -> Vocab:
        """The smoke suite's vocabulary: the specials and exactly the words the tasks use."""
        return cls([*SPECIALS, *ALL_WORDS])

    def encode(self, rows: list[list[str]]) -> torch.Tensor:
        cls_id, sep_id = self.ids["[CLS]"], self.ids["[SEP]"]
        return torch.tensor([[cls_id, *(self.ids[w] for w in r), sep_id] for r in rows], dtype=torch.long)


Rng = torch.Generator
Sampler = Callable[[int, Rng], tuple[list[str], int]]


def _pick(words: Sequence[str], g: Rng) -> str:
    return words[int(torch.randint(len(words), (1,), generator=g))]


def _int(n: int, g: Rng) -> int:
    return int(torch.randint(n, (1,), generator=g))


def _place(fill: list[str], items: Sequence[str], g: Rng) -> list[str]:
    """``fill`` with ``items`` written at distinct random positions, in their given order."""
    pos = sorted(torch.randperm(len(fill), generator=g)[: len(items)].tolist())
    out = list(fill)
    for p, w in zip(pos, items, strict=True):
        out[p] = w
    return out


def _filler(g: Rng) -> list[str]:
    return [_pick(FILLER, g) for _ in range(WORDS)]


def sentiment_negation(label: int, g: Rng) -> list[str]:
    """Polarity of the one adjective, flipped when ``not`` stands right before it (2 classes)."""
    negated = _int(2, g)
    positive = label ^ negated
    adj = _pick(POSITIVE if positive else NEGATIVE, g)
    row = _filler(g)
    p = 1 + _int(WORDS - 1, g)
    row[p] = adj
    if negated:
        row[p - 1] = "not"
    return row


def topic_majority(label: int, g: Rng) -> list[str]:
    """Which of animals / colours / foods / countries supplies three words; the others one each
    at most (4 classes)."""
    words = [_pick(CATEGORIES[label], g) for _ in range(3)]
    others = [c for i, c in enumerate(CATEGORIES) if i != label]
    words += [_pick(c, g) for c in others if _int(2, g)]
    order = torch.randperm(len(words), generator=g).tolist()
    return _place(_filler(g), [words[i] for i in order], g)


def continent(label: int, g: Rng) -> list[str]:
    """Continent (Europe / Asia / the Americas) of the one country named (3 classes)."""
    return _place(_filler(g), [_pick((EUROPE, ASIA, AMERICAS)[label], g)], g)


def number_compare(label: int, g: Rng) -> list[str]:
    """Whether the first of two number words is the larger (2 classes)."""
    a, b = sorted(torch.randperm(len(NUMBERS), generator=g)[:2].tolist())
    first, second = (b, a) if label else (a, b)
    return _place(_filler(g), [NUMBERS[first], NUMBERS[second]], g)


def animal_before_color(label: int, g: Rng) -> list[str]:
    """Whether the animal comes before the colour (2 classes)."""
    pair = [_pick(ANIMALS, g), _pick(COLORS, g)]
    return _place(_filler(g), pair if label else pair[::-1], g)


def repeated_word(label: int, g: Rng) -> list[str]:
    """Whether one of four nouns (animals and foods) occurs twice (2 classes)."""
    pool = ANIMALS + FOODS
    idx = torch.randperm(len(pool), generator=g)[:4].tolist()
    words = [pool[i] for i in idx]
    if label:
        words[3] = words[_int(3, g)]
    order = torch.randperm(4, generator=g).tolist()
    return _place(_filler(g), [words[i] for i in order], g)


def last_category(label: int, g: Rng) -> list[str]:
    """Category (animal / colour / food / country) of the last of three nouns (4 classes)."""
    words = [_pick(CATEGORIES[_int(4, g)], g) for _ in range(2)] + [_pick(CATEGORIES[label], g)]
    return _place(_filler(g), words, g)


def count_colors(label: int, g: Rng) -> list[str]:
    """How many colour words (one, two or three) among foods and fillers (3 classes)."""
    words = [_pick(COLORS, g) for _ in range(label + 1)] + [_pick(FOODS, g) for _ in range(3 - label)]
    order = torch.randperm(len(words), generator=g).tolist()
    return _place(_filler(g), [words[i] for i in order], g)


@dataclass(frozen=True)
class Task:
    name: str
    classes: int
    make: Callable[[int, Rng], list[str]]

    @property
    def doc(self) -> str:
        return (self.make.__doc__ or "").strip()

    def sample(self, n: int, g: Rng, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples with labels cycling through the classes, in a seeded random order."""
        labels = torch.arange(n) % self.classes
        labels = labels[torch.randperm(n, generator=g)]
        rows = [self.make(int(y), g) for y in labels]
        return vocab.encode(rows), labels


TASKS = {
    t.name: t
    for t in (
        Task("sentiment_negation", 2, sentiment_negation),
        Task("topic_majority", 4, topic_majority),
        Task("continent", 3, continent),
        Task("number_compare", 2, number_compare),
        Task("animal_before_color", 2, animal_before_color),
        Task("repeated_word", 2, repeated_word),
        Task("last_category", 4, last_category),
        Task("count_colors", 3, count_colors),
    )
}
