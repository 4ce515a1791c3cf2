"""Spherical merges: interpolation and means on the hypersphere, and Model Stock's geometry.

Each needs a statistic of the whole tensor (norms, dot products, a Gram matrix of the inputs)
before any entry can be written, so all run over row chunks (``chunks.register_chunked``):
statistics passes that keep only scalars or a small matrix, then an apply pass. The statistics
span the tensor mergekit fuses a stored tensor into (a MoE layer's experts), as mergekit's do. multislerp and
nuslerp take an optional base: with one, they work on task vectors about it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.methods.chunks import ChunkSource, register_chunked
from raymerge.engine.methods.registry import REQUIRED, MergeArgs, Param, Scope

S, M = Scope.SHARED, Scope.MODEL


def slerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Spherical interpolation from the base (t=0) to the one expert (t=1) over the whole tensor.

    The angle comes from the normalised flattened tensors; nearly collinear pairs (|cos| >
    0.9995) fall back to linear interpolation. Coefficients apply to the raw tensors.
    """
    t = float(args.shared["t"])
    eps = 1e-8
    sa = sb = dot = 0.0
    for g, r0, r1 in _stats_ranges(src):
        a, b = g.base(r0, r1).double(), g.expert(0, r0, r1).double()
        sa += float((a * a).sum())
        sb += float((b * b).sum())
        dot += float((a * b).sum())
    na, nb = math.sqrt(sa), math.sqrt(sb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (na * nb)))
    if abs(cos) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(cos)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    for r0, r1 in src.ranges:
        yield ca * src.base(r0, r1) + cb * src.expert(0, r0, r1)


register_chunked(
    "slerp",
    slerp,
    (Param("t", float, S, REQUIRED, "0 = base, 1 = other model", low=0.0, high=1.0),),
    "https://en.wikipedia.org/wiki/Slerp",
    max_experts=1,
    work_buffers=lambda n: 6,
    group_stats=True,
)


def _stats_ranges(src: ChunkSource) -> Iterator[tuple[ChunkSource, int, int]]:
    """Every row chunk the tensor-wide statistics span: the tensor's, then those of the rest of
    the tensor mergekit fuses it into (a MoE layer's experts, ``stats_sources``)."""
    for g in src.stats_sources:
        for r0, r1 in g.ranges:
            yield g, r0, r1


def _origin_and_points(src: ChunkSource, r0: int, r1: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(base chunk or None, the experts' chunks relative to it)."""
    if not src.has_base:
        return None, [src.expert(t, r0, r1) for t in range(src.n_experts)]
    base = src.base(r0, r1)
    return base, [src.expert(t, r0, r1) - base for t in range(src.n_experts)]


def multislerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Barycentric interpolation on the hypersphere (mergekit's ``multislerp``), about the base
    when there is one. The inputs are projected to unit length, averaged with the (normalised)
    weights, and the mean direction is scaled to the weighted mean of their norms. (mergekit also
    maps the weighted tangent vectors at that mean back with the exponential map, but they sum to
    zero by construction, so that step changes nothing beyond rounding.) Two passes: the norms,
    then the norm of the weighted mean of unit vectors."""
    weights = [float(p["weight"]) for p in args.per_model]
    n = src.n_experts
    if n == 1:  # nothing to interpolate: the one model as it is
        for r0, r1 in src.ranges:
            yield src.expert(0, r0, r1)
        return
    if bool(args.shared["normalize_weights"]):
        total = sum(weights)
        weights = [w / total for w in weights]
    eps = float(args.shared["eps"])
    squares = torch.zeros(n, dtype=torch.float64)
    for g, r0, r1 in _stats_ranges(src):
        _, pts = _origin_and_points(g, r0, r1)
        squares += torch.stack([p.to(torch.float64).square().sum() for p in pts]).cpu()
    norms = squares.sqrt().tolist()

    def mean_chunk(pts: list[torch.Tensor]) -> torch.Tensor:
        m = torch.zeros_like(pts[0])
        for p, w, nrm in zip(pts, weights, norms, strict=True):
            m.add_(p / (nrm + eps) * w)  # mergekit's rounding order: unit vector, then weight
        return m

    mean_sq = 0.0
    for g, r0, r1 in _stats_ranges(src):
        mean_sq += float(mean_chunk(_origin_and_points(g, r0, r1)[1]).to(torch.float64).square().sum())
    mean_norm = mean_sq**0.5
    if mean_norm < eps and n != 2:
        raise RecipeError(
            "multislerp: the weighted mean of the unit-length inputs is zero (antipodal inputs "
            "whose weights balance out)",
            tensor=args.tensor_name,
            hint="use other weights",
        )
    scale = sum(w * nrm for w, nrm in zip(weights, norms, strict=True)) / mean_norm if mean_norm >= eps else 0.0
    for r0, r1 in src.ranges:
        base, pts = _origin_and_points(src, r0, r1)
        if mean_norm < eps:  # two balanced antipodes: mergekit falls back to the weighted sum
            out = pts[0] * weights[0] + pts[1] * weights[1]
        else:
            out = mean_chunk(pts).mul_(scale)
        yield out if base is None else base + out


register_chunked(
    "multislerp",
    multislerp,
    (
        Param("weight", float, M, REQUIRED, "this model's weight in the spherical mean"),
        Param("normalize_weights", bool, S, True, "divide the weights by their sum"),
        Param("eps", float, S, 1e-8, "added to norms before dividing", low=0.0),
    ),
    "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    needs_base=False,
    work_buffers=lambda n: n + 4,
    group_stats=True,
)


def _slerp_coefficients(
    s00: torch.Tensor, s11: torch.Tensor, s01: torch.Tensor, t: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (a, b) of result = a·v0 + b·v1 for slerp at ``t`` between v0 and v1, from the
    sums of squares and the dot product (fp64), per group; mergekit's nuslerp rule, including its
    linear fallback for (anti)colinear inputs."""
    cos = (s01 / (s00.sqrt().clamp(min=1e-7) * s11.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    a = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    b = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return a, b


def nuslerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Slerp between two models (mergekit's ``nuslerp``), of their task vectors when there is a
    base, at t = w₁/(w₀ + w₁): over the whole flattened tensor (``nuslerp_flatten``, default), per
    row (along the last dimension) or per column (``nuslerp_row_wise``: along the first)."""
    w0, w1 = (float(p["weight"]) for p in args.per_model)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    flatten = bool(args.shared["nuslerp_flatten"])
    mode = "whole" if flatten or len(src.shape) <= 1 else ("columns" if args.shared["nuslerp_row_wise"] else "rows")
    sums: list[torch.Tensor] = []
    if mode != "rows":  # one pass: sums of squares and the dot product, whole or per column
        acc = None
        chunks = _stats_ranges(src) if mode == "whole" else ((src, r0, r1) for r0, r1 in src.ranges)
        for g, r0, r1 in chunks:
            _, (v0, v1) = _origin_and_points(g, r0, r1)
            v0, v1 = v0.to(torch.float64), v1.to(torch.float64)
            dim = None if mode == "whole" else 0
            part = [(v0 * v0).sum(dim), (v1 * v1).sum(dim), (v0 * v1).sum(dim)]
            acc = part if acc is None else [x + y for x, y in zip(acc, part, strict=True)]
        assert acc is not None
        sums = acc
    coef = _slerp_coefficients(sums[0], sums[1], sums[2], t) if sums else None
    last = src.shape[-1] if src.shape else 1
    for r0, r1 in src.ranges:
        base, (v0, v1) = _origin_and_points(src, r0, r1)
        if coef is not None:
            a, b = (c.to(v0.device, v0.dtype) for c in coef)
            out = a * v0 + b * v1
        else:  # per row of the last dimension, inside this chunk
            r0w, r1w = v0.reshape(-1, last), v1.reshape(-1, last)
            x0, x1 = r0w.to(torch.float64), r1w.to(torch.float64)
            a, b = _slerp_coefficients(
                (x0 * x0).sum(1, keepdim=True), (x1 * x1).sum(1, keepdim=True), (x0 * x1).sum(1, keepdim=True), t
            )
            out = (a.to(v0.dtype) * r0w + b.to(v0.dtype) * r1w).reshape(v0.shape)
        yield out if base is None else base + out


register_chunked(
    "nuslerp",
    nuslerp,
    (
        Param("weight", float, M, REQUIRED, "t = w₁ / (w₀ + w₁)"),
        Param("nuslerp_flatten", bool, S, True, "slerp the whole tensor as one vector"),
        Param("nuslerp_row_wise", bool, S, False, "without flatten: slerp each column (else each row)"),
    ),
    "https://github.com/arcee-ai/mergekit",
    needs_base=False,
    min_experts=2,
    max_experts=2,
    work_buffers=lambda n: 8,
    group_stats=True,
)


def karcher(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Karcher (Riemannian) mean of the models on the unit hypersphere, scaled by their mean norm
    (mergekit's ``karcher``; equal weights, every listed model an input, and a ``base_model``
    the list leaves out as one more, after them, as mergekit adds it).

    Every iterate of mergekit's fixed-point iteration is a combination of the unit vectors
    u_t = x_t/‖x_t‖, so the iteration runs on those coefficients with the Gram matrix G = (u_s·u_t):
    one pass over the chunks for G, one to write Σ c_t u_t — memory stays a stack of chunks
    however large the tensor, and the result equals the iteration on full tensors.
    """
    n = src.n_experts
    if n == 1:
        for r0, r1 in src.ranges:
            yield src.expert(0, r0, r1)
        return
    max_iter, tol = int(args.shared["max_iter"]), float(args.shared["tol"])
    raw = torch.zeros(n, n, dtype=torch.float64)
    for g, r0, r1 in _stats_ranges(src):
        x = torch.stack([g.expert(t, r0, r1).reshape(-1) for t in range(n)]).to(torch.float64)
        raw += (x @ x.T).cpu()
    norms = raw.diagonal().clamp(min=0).sqrt()
    valid = [t for t in range(n) if float(norms[t]) > tol]
    scale = float(norms.sum()) / n  # Σ α_t‖x_t‖ with α_t = 1/n over every input, as mergekit
    if not valid:
        for r0, r1 in src.ranges:
            yield torch.zeros_like(src.expert(0, r0, r1))
        return
    idx = torch.tensor(valid)
    gram = raw[idx][:, idx] / (norms[idx, None] * norms[None, idx])
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return float(c @ gram @ c) ** 0.5 if float(c @ gram @ c) > 0 else 0.0

    c = alpha.clone()
    m = norm(c)
    c = torch.eye(len(valid), dtype=torch.float64)[0] if m < tol else c / m
    for _ in range(max_iter):
        dots = (gram @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        move = theta >= tol
        step = torch.where(
            move, alpha * theta / torch.sin(torch.where(move, theta, torch.ones_like(theta))), torch.zeros_like(theta)
        )
        tangent = step - (step * dots).sum() * c  # Σ_t step_t (u_t − d_t·mean), in coefficients
        tn = norm(tangent)
        if tn < tol:
            break
        c = c * math.cos(tn) + tangent * (math.sin(tn) / tn)
        un = norm(c)
        if un > tol:
            c = c / un
    coef = {t: scale * float(c[i]) / float(norms[t]) for i, t in enumerate(valid)}
    for r0, r1 in src.ranges:
        out = torch.zeros_like(src.expert(valid[0], r0, r1))
        for t, k in coef.items():
            out.add_(src.expert(t, r0, r1), alpha=k)
        yield out


register_chunked(
    "karcher",
    karcher,
    (
        Param("max_iter", int, S, 10, "fixed-point iterations at most", low=0),
        Param("tol", float, S, 1e-5, "stop when the tangent step is shorter; norms below it are ignored", low=0.0),
    ),
    "https://arxiv.org/abs/2603.04972",
    needs_base=False,
    includes_base_in_inputs=True,
    base_joins_inputs=True,
    work_buffers=lambda n: n + 4,
    group_stats=True,
)


def _stock_t(cos: torch.Tensor, k: int) -> torch.Tensor:
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(denom), denom))


def model_stock(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Model Stock (Jang et al. 2024): move from the base towards the experts' mean by
    t = k·cosθ / (1 + (k−1)·cosθ), cosθ the mean pairwise cosine of task vectors over the whole
    tensor, or with ``filter_wise`` per vector along the last dimension (mergekit's filters: a
    matrix's rows, a 4-D convolution's kernel rows)."""
    k = src.n_experts
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    # A 1-D tensor is a single filter (mergekit unsqueezes it), so it takes the whole-tensor path.
    filter_wise = bool(args.shared["filter_wise"]) and not src.vector

    def cosines(dots: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(dots[0])
        for n, (i, j) in enumerate(pairs):
            norm = (sq[i].sqrt() * sq[j].sqrt()).clamp(min=1e-6)
            total += (dots[n] / norm).clamp(-1, 1)
        return total / len(pairs)

    scalar_t = None
    if not filter_wise:
        dots = torch.zeros(len(pairs), dtype=torch.float64)
        sq = torch.zeros(k, dtype=torch.float64)
        for s in src.stats_sources:  # the tensor, then the rest of the tensor mergekit fuses
            for r0, r1 in s.ranges:
                base = s.base(r0, r1)
                offs = [(s.expert(t, r0, r1) - base).double() for t in range(k)]
                for n, (i, j) in enumerate(pairs):
                    dots[n] += (offs[i] * offs[j]).sum()
                for i in range(k):
                    sq[i] += (offs[i] * offs[i]).sum()
        scalar_t = _stock_t(cosines(dots, sq), k)
    for r0, r1 in src.ranges:
        base = src.base(r0, r1)
        rows = base.shape
        xs = [src.expert(t, r0, r1) for t in range(k)]
        if scalar_t is None:
            # mergekit's filters run along the last dimension (a convolution's kernel width), not
            # along the flattened row a chunk holds.
            last = src.shape[-1] if len(src.shape) > 2 else rows[-1]
            base, xs = base.reshape(-1, last), [x.reshape(-1, last) for x in xs]
            offs = [x - base for x in xs]
            dots = torch.stack([(offs[i] * offs[j]).sum(-1) for i, j in pairs])
            sq = torch.stack([(o * o).sum(-1) for o in offs])
            t = _stock_t(cosines(dots, sq), k).unsqueeze(-1)
        else:
            t = scalar_t.to(base.dtype)
        mean = torch.stack(xs).mean(0) if k else base
        yield (t * mean + (1 - t) * base).reshape(rows)


register_chunked(
    "model_stock",
    model_stock,
    (Param("filter_wise", bool, S, False),),
    "https://arxiv.org/abs/2403.19522",
    min_experts=2,
    group_stats=True,
    work_buffers=lambda n: 2 * n + 6,
)
