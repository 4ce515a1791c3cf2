"""Recipes: mergekit's YAML schema where the two overlap, plus a ``raymerge:`` section.

Parsing is strict where a mistake is likely: unknown keys, methods and parameter names are
errors with a "did you mean" suggestion. A parameter that some method knows but this one does not
use (``weight`` given to slerp, ``normalize`` to model_stock) is what mergekit ignores, so it is
ignored here too, with one warning line (``strict=True``, ``--strict``: an error). Parameter values follow mergekit: a scalar, a gradient (list of numbers interpolated
over layer depth), or conditionals ``[{filter: substring, value: …}, …]``; per-model settings
take precedence over top-level ones, which take precedence over the method's default.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raymerge.engine.arch import depth_fraction, mergekit_name
from raymerge.engine.errors import RecipeError
from raymerge.engine.methods import METHODS, MethodSpec, Param, Scope
from raymerge.engine.safeio import decode_text, load_yaml, read_regular
from raymerge.engine.storage import dtype_from_name
from raymerge.engine.tokenizer import TokenizerSection, check_tokenizer
from raymerge.engine.urls import redact_text

log = logging.getLogger(__name__)
RECIPE_BYTES = 4 << 20  # a recipe is a few kB; literal chat templates make it tens

_UNSUPPORTED = {
    "modules": "per-module recipes are not supported; list whole models under `models`",
}


def suggest(word: str, choices: list[str] | set[str] | tuple[str, ...]) -> str:
    """A ``did you mean`` hint for a misspelt key, or the list of valid choices."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid: " + ", ".join(sorted(choices))


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            if key in _UNSUPPORTED:
                raise RecipeError(f"{where}: {_UNSUPPORTED[key]}")
            raise RecipeError(f"{where}: unknown key {key!r}", hint=suggest(str(key), allowed))


class RaymergeOptions(BaseModel):
    """raymerge's own recipe keys (mergekit has no equivalent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="seed for random methods (DARE); the merge is deterministic given it")
    chunk_bytes: int = Field(
        4 << 20, gt=0, description="bytes of one compute-dtype input chunk (row-chunked methods and tasks)"
    )
    device: str = Field("auto", description="auto | cpu | cuda")
    compute_dtype: str | None = Field(
        None, description="default float32; mergekit: recipe dtype, mergekit's arithmetic"
    )
    split_fused: bool = Field(
        False, description="merge packed projections (qkv_proj, gate_up_proj) block by block instead of as stored"
    )
    exclude: list[str] = Field(
        default_factory=list, description="regexes of tensor names merged with the method's fallback (mean) instead"
    )
    allow_pickle_bin: bool = Field(
        False,
        description="read pytorch_model*.bin checkpoints (torch.load with weights_only=True) when a model has no "
        "safetensors; refused by default",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("device must be auto, cpu or cuda")
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regex: {exc}") from None
        return v


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One input of an output slice: blocks [start, end) of ``model``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceEntry(BaseModel):
    """One output slice (mergekit's ``OutputSliceDefinition``): its sources' blocks merged in step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @property
    def length(self) -> int:
        """Blocks this slice contributes to the output."""
        lo, hi = self.sources[0].layer_range
        return hi - lo

    def source(self, url: str) -> SliceSource:
        return next(s for s in self.sources if s.model == url)


class Recipe(BaseModel):
    """A validated recipe. ``source`` keeps the original YAML text for the model card.

    Exactly one of ``models`` (whole models merged tensor by tensor) and ``slices`` (output blocks
    stacked from block ranges of the inputs, mergekit's frankenmerge / depth up-scaling syntax).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] = Field(default_factory=list)
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    name: str | None = None
    raymerge: RaymergeOptions = Field(default_factory=RaymergeOptions)
    source: str = ""

    @property
    def method(self) -> MethodSpec:
        return METHODS[self.merge_method]

    @property
    def vocab_source(self) -> str | None:
        """Where the output tokenizer is built from (``tokenizer.source`` or ``tokenizer_source``);
        None: the base model's tokenizer files are copied as they are."""
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def slice_base(self, s: SliceEntry) -> str | None:
        """The base of one output slice: its own ``base_model``, else the recipe's."""
        return s.base_model or self.base_model

    def slice_has_base(self, s: SliceEntry) -> bool:
        """Whether the slice's tasks read a base (first input) besides the experts."""
        base = self.slice_base(s)
        return self.method.needs_base or (base is not None and not self.method.includes_base_in_inputs)

    def slice_experts(self, s: SliceEntry) -> list[str]:
        """A slice's models merged against its base, in source order (all for base-free methods)."""
        base = self.slice_base(s)
        if self.method.includes_base_in_inputs or not base:
            return [x.model for x in s.sources]
        return [x.model for x in s.sources if x.model != base]

    def expert_urls(self) -> list[str]:
        """The models merged against the base, in recipe order (all models for base-free methods)."""
        if self.slices:
            return list(dict.fromkeys(u for s in self.slices for u in self.slice_experts(s)))
        listed = [m.model for m in self.models]
        if self.method.base_joins_inputs and self.base_model and self.base_model not in listed:
            return [*listed, self.base_model]  # mergekit appends an unlisted base as one more input
        if self.method.includes_base_in_inputs or not self.base_model:
            return listed
        return [m.model for m in self.models if m.model != self.base_model]

    def model_urls(self) -> list[str]:
        """Every checkpoint the merge reads: base first (when used), then the experts."""
        if self.slices:
            bases = [self.base_model] if self.base_model else []
            urls = [*bases, *(u for s in self.slices for u in [s.base_model, *(x.model for x in s.sources)] if u)]
            return list(dict.fromkeys(urls))
        experts = self.expert_urls()
        if self.base_model and not self.method.includes_base_in_inputs:
            return [self.base_model, *experts]
        if self.base_model and self.base_model not in experts:
            return [*experts, self.base_model]
        return experts

    def entry(self, url: str) -> ModelEntry | None:
        for m in self.models:
            if m.model == url:
                return m
        return None


RECIPE_KEYS = set(Recipe.model_fields) - {"source"}


def _validate_setting(value: Any, where: str) -> None:
    """Reject parameter values that are not scalars, gradients or filter conditionals."""
    scalar = (bool, int, float, str)
    if isinstance(value, scalar):
        return
    if isinstance(value, dict):
        _check_keys(value, {"filter", "value"}, where)
        if "value" not in value:
            raise RecipeError(f"{where}: a conditional needs a `value`")
        _validate_setting(value["value"], where)
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, scalar) for v in value):
            return
        if all(isinstance(v, dict) for v in value):
            for v in value:
                _validate_setting(v, where)
            return
    raise RecipeError(f"{where}: expected a number, a list of numbers or [{{filter, value}}, …], got {value!r}")


def _setting_values(value: Any) -> list[Any]:
    """Every scalar a (validated) setting can take: the points of a gradient, each conditional's."""
    if isinstance(value, dict):
        return _setting_values(value["value"])
    if isinstance(value, list):
        return [v for item in value for v in _setting_values(item)]
    return [value]


def _is_gradient(value: Any) -> bool:
    """Whether a (validated) setting interpolates anywhere: a list of two or more numbers."""
    if isinstance(value, dict):
        return _is_gradient(value["value"])
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):
            return any(_is_gradient(v) for v in value)
        return len(value) > 1
    return False


def known_parameters() -> frozenset[str]:
    """Every parameter name some registered method takes (mergekit's names where they overlap)."""
    return frozenset(p.name for spec in METHODS.values() for p in spec.params)


def _check_params(
    params: dict[str, Any], method: MethodSpec, scope_ok: set[Scope], where: str, strict: bool = False
) -> None:
    """Validate ``params`` for ``method`` in place: an unknown name is an error with a suggestion; a
    name only other methods use is dropped with a warning (an error when ``strict``)."""
    names = [p.name for p in method.params]
    for key in list(params):
        value = params[key]
        spec = method.param(key)
        if spec is None:
            if key not in known_parameters() or strict:
                raise RecipeError(
                    f"{where}: method {method.name!r} has no parameter {key!r}",
                    hint=suggest(key, names) if key not in known_parameters() else "remove it, or run without --strict",
                )
            log.warning("%s: method %r does not use parameter %r; ignored (as mergekit does)", where, method.name, key)
            del params[key]
            continue
        if spec.scope not in scope_ok:
            raise RecipeError(f"{where}: {key!r} is a shared parameter; set it under the top-level `parameters`")
        _validate_setting(value, f"{where}.{key}")
        if spec.kind is not float and _is_gradient(value):
            raise RecipeError(
                f"{where}.{key}: a gradient interpolates between its points, but {method.name!r} takes "
                f"{key!r} as {spec.kind.__name__}, not a real number",
                hint="give one value, or one value per filter",
            )
        # Gradients interpolate between their points and ranges are intervals, so checking every
        # point here covers every value a tensor can resolve to: a bad value fails before planning.
        for v in _setting_values(value):
            _coerce(v, spec, where, method.name)


def parse_recipe(text: str, origin: str = "<recipe>", *, strict: bool = False) -> Recipe:
    """Parse and validate recipe YAML (safe loader only); ``strict``: unused parameters are errors."""
    raw = load_yaml(text, file=origin, error=RecipeError, what="recipe")
    if not isinstance(raw, dict):
        raise RecipeError("recipe must be a YAML mapping", file=origin)
    _check_keys(raw, RECIPE_KEYS, origin)
    if "merge_method" not in raw:
        raise RecipeError("recipe needs `merge_method`", file=origin, hint="valid: " + ", ".join(sorted(METHODS)))
    method_name = raw["merge_method"]
    if not isinstance(method_name, str):
        raise RecipeError(f"merge_method must be a method name, got {method_name!r}", file=origin)
    if method_name not in METHODS:
        raise RecipeError(f"unknown merge_method {method_name!r}", file=origin, hint=suggest(str(method_name), METHODS))
    method = METHODS[method_name]
    models = raw.get("models")
    if "slices" in raw:
        if models is not None:
            raise RecipeError("give either `models` or `slices`, not both", file=origin)
        _parse_slices(raw["slices"], method, origin, strict)
        models = []
    elif not isinstance(models, list) or not models:
        raise RecipeError("recipe needs a non-empty `models` list", file=origin)
    for i, m in enumerate(models):
        if isinstance(m, str):
            models[i] = m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"models[{i}] must be a mapping with a `model` key", file=origin)
        _check_keys(m, {"model", "parameters"}, f"{origin}: models[{i}]")
        if isinstance(m.get("parameters"), dict):
            where = f"models[{i}] ({m['model']}).parameters"
            _check_params(m["parameters"], method, {Scope.MODEL}, where, strict)
    if isinstance(raw.get("parameters"), dict):
        _check_params(raw["parameters"], method, {Scope.MODEL, Scope.SHARED}, "parameters", strict)
    if isinstance(raw.get("raymerge"), dict):
        _check_keys(raw["raymerge"], set(RaymergeOptions.model_fields), f"{origin}: raymerge")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            try:
                dtype_from_name(str(raw[key]))
            except ValueError as exc:
                raise RecipeError(f"{key}: {exc}", file=origin) from None
    for key in ("parameters",):
        if raw.get(key) is None:
            raw.pop(key, None)
    for m in models:
        if m.get("parameters") is None:
            m.pop("parameters", None)
    try:
        recipe = Recipe(**raw, source=redact_text(text))  # written into the output: no credentials
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{loc}: {first['msg']}", file=origin) from None
    _check_structure(recipe, origin)
    return recipe


def _parse_slices(slices: Any, method: MethodSpec, origin: str, strict: bool) -> None:
    """Check mergekit's ``slices`` syntax in place (keys, layer ranges, parameters), before pydantic."""
    if not isinstance(slices, list) or not slices:
        raise RecipeError("recipe needs a non-empty `slices` list of {sources: [...]}", file=origin)
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or "sources" not in sl:
            raise RecipeError(f"{where} must be a mapping with a `sources` list", file=origin)
        if "residual_weight" in sl:
            log.warning("%s: residual_weight is ignored (as mergekit does)", where)
            del sl["residual_weight"]
        _check_keys(sl, {"sources", "base_model", "parameters"}, f"{origin}: {where}")
        sources = sl["sources"]
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{where}.sources must be a non-empty list", file=origin)
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{at} must be a mapping with `model` and `layer_range: [start, end]`", file=origin)
            _check_keys(src, {"model", "layer_range", "parameters"}, f"{origin}: {at}")
            lr = src["layer_range"]
            ints = isinstance(lr, list) and len(lr) == 2 and all(type(v) is int for v in lr)
            if not ints or not 0 <= lr[0] < lr[1]:
                raise RecipeError(
                    f"{at}.layer_range must be [start, end] with 0 <= start < end, got {lr!r}", file=origin
                )
            if isinstance(src.get("parameters"), dict):
                _check_params(src["parameters"], method, {Scope.MODEL}, f"{at} ({src['model']}).parameters", strict)
            if src.get("parameters") is None:
                src.pop("parameters", None)
        if isinstance(sl.get("parameters"), dict):
            _check_params(sl["parameters"], method, {Scope.MODEL, Scope.SHARED}, f"{where}.parameters", strict)
        if sl.get("parameters") is None:
            sl.pop("parameters", None)
        lengths = [s["layer_range"][1] - s["layer_range"][0] for s in sources]
        if len(set(lengths)) > 1:
            raise RecipeError(f"{where}: every source must span the same number of layers, got {lengths}", file=origin)


def _check_slices(recipe: Recipe, origin: str) -> None:
    """Per output slice: a base where the method needs one (and among the sources when it is read),
    the method's number of models, no model twice, and every required per-model parameter."""
    method = recipe.method
    for i, s in enumerate(recipe.slices):
        where = f"slices[{i}]"
        base = recipe.slice_base(s)
        if method.needs_base and not base:
            raise RecipeError(f"{where}: method {method.name!r} needs `base_model`", file=origin)
        urls = [x.model for x in s.sources]
        dup = {u for u in urls if urls.count(u) > 1}
        if dup:
            raise RecipeError(f"{where}: model {sorted(dup)[0]!r} is listed twice", file=origin)
        if recipe.slice_has_base(s) and base not in urls:
            raise RecipeError(
                f"{where}: base model {base!r} is not one of the slice's sources",
                file=origin,
                hint="list the base with the same layer_range as the others",
            )
        n = len(recipe.slice_experts(s))
        if n < method.min_experts or (method.max_experts is not None and n > method.max_experts):
            most = "" if method.max_experts is None else f" and at most {method.max_experts}"
            raise RecipeError(
                f"{where}: method {method.name!r} needs at least {method.min_experts}{most} model(s) besides "
                f"the base, got {n}",
                file=origin,
            )
        for p in method.params:
            if not p.required:
                continue
            if p.scope == Scope.SHARED and p.name not in s.parameters and p.name not in recipe.parameters:
                raise RecipeError(f"{where}: method {method.name!r} needs parameter {p.name!r}", file=origin)
            if p.scope == Scope.MODEL:
                for url in recipe.slice_experts(s):
                    if not any(p.name in d for d in (s.source(url).parameters, s.parameters, recipe.parameters)):
                        raise RecipeError(
                            f"{where}: model {url!r} needs parameter {p.name!r} for method {method.name!r}",
                            file=origin,
                        )


def _check_structure(recipe: Recipe, origin: str) -> None:
    method = recipe.method
    if recipe.slices:
        _check_slices(recipe, origin)
        check_tokenizer(recipe.tokenizer_source, recipe.tokenizer, recipe.model_urls(), origin)
        return
    if method.needs_base and not recipe.base_model:
        raise RecipeError(f"method {method.name!r} needs `base_model`", file=origin)
    n = len(recipe.expert_urls())
    if n < method.min_experts:
        raise RecipeError(
            f"method {method.name!r} needs at least {method.min_experts} model(s) besides the base, got {n}",
            file=origin,
        )
    if method.max_experts is not None and n > method.max_experts:
        raise RecipeError(
            f"method {method.name!r} takes at most {method.max_experts} model(s) besides the base, got {n}", file=origin
        )
    urls = [m.model for m in recipe.models]
    dup = {u for u in urls if urls.count(u) > 1}
    if dup:
        raise RecipeError(f"model {sorted(dup)[0]!r} is listed twice", file=origin)
    check_tokenizer(recipe.tokenizer_source, recipe.tokenizer, recipe.model_urls(), origin)
    # Required per-model parameters must be resolvable for every expert (checked per tensor later
    # too, but a recipe that can never work should fail before any checkpoint is opened).
    for p in method.params:
        if p.required and p.scope == Scope.MODEL and p.name not in recipe.parameters:
            for url in recipe.expert_urls():
                entry = recipe.entry(url)
                if entry is None or p.name not in entry.parameters:
                    raise RecipeError(
                        f"model {url!r} needs parameter {p.name!r} for method {method.name!r}", file=origin
                    )
        if p.required and p.scope == Scope.SHARED and p.name not in recipe.parameters:
            raise RecipeError(f"method {method.name!r} needs top-level parameter {p.name!r}", file=origin)


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    """Read a recipe file; relative model paths are taken as given (relative to the cwd)."""
    return parse_recipe(read_recipe_text(path), str(path), strict=strict)


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text: a regular file of at most ``RECIPE_BYTES``, UTF-8."""
    data = read_regular(path, limit=RECIPE_BYTES, error=RecipeError, what="recipe")
    return decode_text(data, file=str(path), error=RecipeError, what="recipe")


_NOT_FOUND = object()


def _coerce(value: Any, param: Param, where: str, method: str = "") -> Any:
    """``value`` as the parameter's type, checked against its choices and range."""
    kind = param.kind
    owner = f"parameter {param.name!r}" + (f" of method {method!r}" if method else "")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            out = int(value)
        elif param.choices is not None and str(value) not in param.choices:
            raise RecipeError(
                f"{where}: {owner} must be one of {', '.join(param.choices)}, got {value!r}",
                hint=suggest(str(value), param.choices),
            )
        else:
            out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise RecipeError(f"{where}: {owner} expects {kind.__name__}, got {value!r}") from None
    if not param.accepts(out):
        raise RecipeError(f"{where}: {owner} must be {param.allowed()}, got {value!r}")
    return out


def evaluate_setting(setting: Any, tensor_name: str, t: float, param: Param, where: str) -> Any:
    """Resolve one setting for a tensor at layer-depth ``t`` ∈ [0, 1] (mergekit semantics: a
    gradient of any length is interpolated over [0, 1], so every length fits)."""
    t = min(1.0, max(0.0, t))
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(s, dict) for s in setting):
            for cond in setting:
                filt = cond.get("filter")
                if filt is None or filt == "*" or (tensor_name and str(filt) in tensor_name):
                    return evaluate_setting(cond["value"], tensor_name, t, param, where)
            return _NOT_FOUND
        values = [_coerce(v, param, where) for v in setting]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _coerce((1 - frac) * values[i0] + frac * values[i1], param, where)
    return _coerce(setting, param, where)


def resolve_param(param: Param, scopes: list[dict[str, Any]], tensor_name: str, t: float, where: str) -> Any:
    """First scope (highest precedence first) whose setting applies to this tensor, else default."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param, where)
            if value is not _NOT_FOUND:
                return value
    if param.required:
        raise RecipeError(f"{where}: no value of required parameter {param.name!r} applies", tensor=tensor_name)
    return param.default


@dataclass(frozen=True)
class ResolvedParams:
    shared: dict[str, Any]
    per_model: tuple[dict[str, Any], ...]


def resolve_for_tensor(
    recipe: Recipe,
    tensor_name: str,
    num_layers: int | dict[str, int],
    method: MethodSpec | None = None,
    model_type: Any = None,
) -> ResolvedParams:
    """All parameters of ``method`` (default: the recipe's) for one tensor at mergekit's depth
    ``t``; ``num_layers``: blocks per stack (``arch.stack_depths``), or one count for all.
    Filters match the name mergekit gives the tensor (``arch.mergekit_name``: a published MoE's
    experts by their fused name)."""
    t = depth_fraction(tensor_name, num_layers)
    tensor_name = mergekit_name(tensor_name, model_type)
    method = method or recipe.method
    top = recipe.parameters
    shared = {
        p.name: resolve_param(p, [top], tensor_name, t, "parameters") for p in method.params if p.scope == Scope.SHARED
    }
    per_model = []
    for url in recipe.expert_urls():
        entry = recipe.entry(url)
        scopes = [entry.parameters if entry else {}, top]
        per_model.append(
            {
                p.name: resolve_param(p, scopes, tensor_name, t, f"model {url}")
                for p in method.params
                if p.scope == Scope.MODEL
            }
        )
    return ResolvedParams(shared, tuple(per_model))
