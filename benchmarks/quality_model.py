"""The small encoder of the merge-quality benchmark: MLM pretraining, probes, fine-tuning, eval.

The shared *body* is a ``transformers`` ``BertModel`` without pooler (what raymerge merges);
each task keeps its own *head*, a mean-pool followed by one ``Linear`` (never merged). All
training is seeded and single-process, so a rerun on the same machine and thread count
reproduces the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

from benchmarks.quality_tasks import MASK, SEQ_LEN, VOCAB, Task

HEAD_FILE = "heads.safetensors"


@dataclass(frozen=True)
class EncoderSize:
    """Body shape: hidden width, blocks, attention heads, FFN width."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256

    def config(self) -> BertConfig:
        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=SEQ_LEN,
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            attn_implementation="eager",
        )


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser settings of one training phase (AdamW, linear warm-up then cosine decay)."""

    steps: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.06

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def new_body(size: EncoderSize, seed: int) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(size.config(), add_pooling_layer=False)


def pooled(body: BertModel, x: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over positions (batch × hidden)."""
    return body(input_ids=x).last_hidden_state.mean(dim=1)


class Classifier(nn.Module):
    """Body + one task's head: mean-pooled last hidden state → Linear."""

    def __init__(self, body: BertModel, head: nn.Linear) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.body, x))


def _schedule(opt: torch.optim.Optimizer, spec: TrainSpec) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(spec.warmup * spec.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, spec.steps - warm)
        return 0.5 * (1.0 + float(torch.cos(torch.tensor(progress * torch.pi))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loop(
    params: list[nn.Parameter],
    spec: TrainSpec,
    loss_fn: Callable[[int], torch.Tensor],
    log: Callable[[str], None] | None,
    label: str,
) -> float:
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = _schedule(opt, spec)
    running = 0.0
    for step in range(spec.steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = 0.95 * running + 0.05 * value if step else value
        if log and (step + 1) % max(1, spec.steps // 8) == 0:
            log(f"{label}: step {step + 1}/{spec.steps} loss {running:.4f}")
    return running


def pretrain_mlm(
    size: EncoderSize, corpus: torch.Tensor, spec: TrainSpec, seed: int, log: Callable[[str], None] | None = None
) -> BertModel:
    """Masked-token pretraining of a fresh body on ``corpus`` (n × SEQ_LEN token ids).

    BERT's recipe: 15 % of positions are predicted; of those 80 % become ``MASK``, 10 % a random
    token, 10 % stay. The decoder (a Linear over the last hidden state) is thrown away.
    """
    body = new_body(size, seed)
    decoder = nn.Linear(size.hidden, VOCAB)
    g = torch.Generator().manual_seed(seed + 1)
    body.train()

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(len(corpus), (spec.batch,), generator=g)
        x = corpus[rows].clone()
        target = torch.full_like(x, -100)
        pick = torch.rand(x.shape, generator=g) < 0.15
        target[pick] = x[pick]
        roll = torch.rand(x.shape, generator=g)
        x[pick & (roll < 0.8)] = MASK
        rand_tok = torch.randint(2, VOCAB, x.shape, generator=g)
        swap = pick & (roll >= 0.8) & (roll < 0.9)
        x[swap] = rand_tok[swap]
        logits = decoder(body(input_ids=x).last_hidden_state)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    _loop([*body.parameters(), *decoder.parameters()], spec, loss_fn, log, "pretrain")
    body.eval()
    return body


@torch.no_grad()
def features(body: BertModel, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    body.eval()
    return torch.cat([pooled(body, x[i : i + chunk]) for i in range(0, len(x), chunk)])


def train_probe(body: BertModel, task: Task, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, seed: int) -> nn.Linear:
    """Linear probe: a head trained on the frozen body's pooled features (features computed once)."""
    feats = features(body, x)
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], task.classes)
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(len(feats), (spec.batch,), generator=g)
        return nn.functional.cross_entropy(head(feats[rows]), y[rows])

    _loop(list(head.parameters()), spec, loss_fn, None, f"probe {task.name}")
    return head


def finetune(
    base: BertModel,
    head: nn.Linear,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> tuple[BertModel, nn.Linear]:
    """Full fine-tuning (every body parameter and the head) from ``base``, starting from the
    probe's head (LP-FT), on the task's training split. Returns new modules; inputs untouched."""
    body = new_body(_size_of(base), seed)
    body.load_state_dict(base.state_dict())
    head = _copy_linear(head)
    model = Classifier(body, head)
    model.train()
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(len(x), (spec.batch,), generator=g)
        return nn.functional.cross_entropy(model(x[rows]), y[rows])

    _loop(list(model.parameters()), spec, loss_fn, log, f"finetune {task.name}")
    model.eval()
    return body, head


@torch.no_grad()
def accuracy(body: BertModel, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(features(body, x)).argmax(1) == y).float().mean())


def _size_of(body: BertModel) -> EncoderSize:
    c = body.config
    return EncoderSize(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)


def _copy_linear(head: nn.Linear) -> nn.Linear:
    out = nn.Linear(head.in_features, head.out_features)
    out.load_state_dict(head.state_dict())
    return out


def save_body(body: BertModel, path: Path) -> None:
    """Hugging Face layout: ``config.json`` + ``model.safetensors`` (fp32)."""
    body.save_pretrained(path, safe_serialization=True)


def load_body(path: Path) -> BertModel:
    body = BertModel.from_pretrained(path, add_pooling_layer=False)
    body.eval()
    return body


def save_heads(heads: dict[str, nn.Linear], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().contiguous() for name, h in heads.items() for k, v in h.state_dict().items()}
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps({n: [h.in_features, h.out_features] for n, h in heads.items()}))


def load_heads(path: Path) -> dict[str, nn.Linear]:
    from safetensors.torch import load_file

    shapes = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path))
    heads = {}
    for name, (i, o) in shapes.items():
        h = nn.Linear(i, o)
        h.load_state_dict({"weight": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]})
        heads[name] = h
    return heads
