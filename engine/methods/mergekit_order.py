"""mergekit's arithmetic, for ``raymerge.compute_dtype: mergekit``.

mergekit casts every input to the recipe's ``dtype`` (bf16 or fp16 in most of its examples) and
runs each method's operations in that dtype, in its own order: a rounding after each step, and
selection decisions (TIES' top-k, SCE's variance rank, Arcee Fusion's quantiles, RAM's changed
entries) taken on rounded values. raymerge's own functions compute in fp32 (statistics in fp64)
in an order chosen for bounded memory, so in bf16 their selections and roundings differ from
mergekit's far beyond one ulp. The functions here take whole tensors already in the compute dtype
and follow mergekit 0.1.5's order of operations and casts, so the output matches mergekit's to
its rounding. They hold whole tensors (as mergekit does): memory is that of the tensor times the
inputs, not a chunk's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from raymerge.engine.methods.registry import MergeArgs

Fn = Callable[[torch.Tensor | None, Sequence[torch.Tensor], MergeArgs], torch.Tensor]


def _majority(deltas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """TIES' election: which entries agree in sign with the (rounded) sum over experts."""
    signs = deltas.sign().to(dtype)
    majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return signs == majority


def _top_magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    """``d`` with all but the ``density`` share of largest |d| zeroed (one kept at least)."""
    if density >= 1:
        return d
    if density <= 0 or d.numel() == 0:
        return torch.zeros_like(d)
    k = max(1, int(density * d.numel()))
    keep = torch.zeros(d.numel(), dtype=d.dtype, device=d.device)
    mag = d.abs().reshape(-1)
    if mag.device.type == "cpu":
        mag = mag.float()
    keep[torch.argsort(mag, descending=True)[:k]] = 1
    return d * keep.reshape(d.shape)


def gta(
    base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs, *, magnitude: bool
) -> torch.Tensor:
    """TIES (``magnitude``) and DELLA without a drop (density 1): weighted, sign-elected, normalised."""
    assert base is not None
    if not experts:
        return base
    deltas = base.new_empty((len(experts), *base.shape))
    for i, (x, p) in enumerate(zip(experts, args.per_model, strict=True)):
        d = x - base
        deltas[i] = _top_magnitude(d, float(p.get("density", 1.0))) if magnitude else d
    weights = torch.tensor([float(p["weight"]) for p in args.per_model], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    mask = _majority(deltas, base.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if bool(args.shared.get("normalize", True)):
        mixed /= divisor
    lam = float(args.shared.get("lambda", 1.0))
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def sce(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    assert base is not None
    if not experts:
        return base
    tvs = torch.stack([x - base for x in experts])
    density = float(args.shared.get("select_topk", 1.0))
    if density < 1:
        if density <= 0:
            keep = torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * density)
            keep = torch.zeros_like(var)
            if k:
                keep.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * keep.unsqueeze(0)
    erase = _majority(tvs, base.dtype)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    w = w.reshape(-1, *([1] * base.dim())) * erase
    return base + (tvs * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)


def arcee_fusion(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    assert base is not None
    other = experts[0]
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    # Over 10⁶ elements mergekit takes the quantiles of a random sample (not reproducible); these
    # are the exact ones, which its sample estimates.
    ordered = torch.sort(importance.reshape(-1)).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    keep = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * keep


def ramplus_tl(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    assert base is not None
    if not experts:
        return base
    eps, r, alpha = (float(args.shared[k]) for k in ("epsilon", "r", "alpha"))
    tv = torch.stack([x - base for x in experts]).view(len(experts), -1)
    changed = tv.abs() > eps
    count = changed.sum(dim=0, keepdim=True)
    shared, unique = count > 1, count == 1
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    z = tv * changed
    merged = ((z * unique * boost.unsqueeze(-1)) + (z * shared / count.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def model_stock(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    assert base is not None
    shape = base.shape
    w0, ws = base, list(experts)
    if bool(args.shared.get("filter_wise", False)):
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (k * c) / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


def slerp(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """SLERP in fp32 (fp64 for fp64 inputs) on the tensor as one vector, stored in the input dtype."""
    assert base is not None
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    t = torch.tensor(float(args.shared["t"]), dtype=work).reshape(1, 1)
    a, b = base.reshape(1, -1), experts[0].reshape(1, -1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(base.shape).to(base.dtype)
    step = 1024 * 1024
    spans = [(s, min(a.shape[1], s + step)) for s in range(0, a.shape[1], step)]
    na = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, s:e].to(work), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    nb = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, s:e].to(work), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    na, nb = torch.where(na > 1e-8, na, 1), torch.where(nb > 1e-8, nb, 1)
    dot = torch.stack(
        [((a[:, s:e].to(work) / na) * (b[:, s:e].to(work) / nb)).sum(dim=1, keepdim=True) for s, e in spans]
    )
    dot = dot.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin)
    out = torch.empty_like(a)
    for s, e in spans:
        out[:, s:e] = ca * a[:, s:e].to(work) + cb * b[:, s:e].to(work)
    return out.reshape(base.shape)


def karcher(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Karcher mean with equal weights; norms in fp32 (fp64 for fp64), iterates in the input dtype."""
    xs = list(experts)
    if len(xs) == 1:
        return xs[0]
    max_iter, tol = int(args.shared["max_iter"]), float(args.shared["tol"])
    work = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(xs)] * len(xs)
    norms, units = [], []
    for x in xs:
        n = torch.linalg.vector_norm(x.to(work))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in xs)  # type: ignore[return-value]
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for w, v in zip(a, u, strict=True):
        mean += w * v
    mn = torch.linalg.vector_norm(mean.to(work))
    mean = u[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, v in zip(a, u, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), v.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (v - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(work))
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(work))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    scale = sum(w * n for w, n in zip(alphas, norms, strict=True))
    return scale * mean  # type: ignore[no-any-return]


MERGEKIT_ORDER: dict[str, Fn] = {
    "ties": lambda b, x, a: gta(b, x, a, magnitude=True),
    "della": lambda b, x, a: gta(b, x, a, magnitude=False),
    "sce": sce,
    "arcee_fusion": arcee_fusion,
    "ramplus_tl": ramplus_tl,
    "model_stock": model_stock,
    "slerp": slerp,
    "karcher": karcher,
}


def mergekit_order(method: str, shared: dict[str, object], per_model: Sequence[dict[str, object]]) -> Fn | None:
    """mergekit's arithmetic for ``method`` with these parameters, or None where raymerge's own
    applies (other methods; DELLA with a random drop, which mergekit draws from its own RNG)."""
    if method == "della" and any(float(p.get("density", 1.0)) < 1 for p in per_model):  # type: ignore[arg-type]
        return None
    return MERGEKIT_ORDER.get(method)


__all__ = ["MERGEKIT_ORDER", "mergekit_order"]
