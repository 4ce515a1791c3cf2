"""Activation statistics from forward passes: RegMean's input Grams and per-channel moments.

Given a model (a Hugging Face directory or a loaded ``nn.Module``) and a little unlabelled data,
forward hooks collect

* **input Grams** of every ``nn.Linear``: G = XᵀX / N over the layer's input rows, where a row is
  one non-padding token (the batch's ``attention_mask`` drops padding wherever the input has the
  mask's [batch, seq] leading shape) or one sample for inputs without a sequence axis. Sums are
  accumulated on the device the layer's input arrives on, in fp64 on CPU and on GPUs with full-
  rate FP64, fp32 on other GPUs (``methods.precision.stats_dtype``); the file stores G in fp32 by
  default. The output ``grams.safetensors`` holds one ``[in, in]`` matrix per layer keyed by module
  name: exactly what the ``regmean`` method's ``grams`` parameter reads.
* **per-channel moments** (count, mean, M2 = Σ(x − mean)²) of named modules' outputs over the
  last axis, combined across batches and workers with Chan et al.'s exact pairwise update.

Memory: the Gram file's header is planned before any forward pass; when the accumulators of all
layers would not fit ``memory_budget`` the layers are split into groups, one pass over the data
per group, and each group's Grams are written at their planned offsets as soon as its pass ends,
so at most one group is ever resident. Models larger than the budget load through accelerate
(``init_empty_weights`` + ``load_checkpoint_and_dispatch``, the rest offloaded to disk).

The same pass function runs in this process (``LocalStatsBackend``) or data-parallel on Ray
actors (``raymerge.cluster.stats``); a backend returns partial moments and Gram sums that the
driver combines exactly.

Modules: ``data`` (data files → batches), ``models`` (loading, devices, linear layers),
``moments`` (per-channel moments and their file), ``grams`` (Gram file layout, pass grouping),
``hooks`` (one pass with hooks), ``points`` (which modules to measure), ``backends`` (where passes
run), ``collect`` (``collect_stats``). Everything public is importable from this package.
"""

from raymerge.engine.errors import StatsError
from raymerge.engine.stats.backends import LocalStatsBackend, StatsBackend
from raymerge.engine.stats.collect import SUMMARY_FILE, StatsResult, collect_stats
from raymerge.engine.stats.data import Batch, DataSpec, batch_tokens, load_batches, shard_batches
from raymerge.engine.stats.grams import GRAMS_FILE, GramLayout, plan_gram_groups, read_matrix
from raymerge.engine.stats.hooks import GramSink, PassResult, PassSpec, PointAffine, affine_hook, run_pass
from raymerge.engine.stats.models import (
    LoadedModel,
    checkpoint_bytes,
    input_features,
    linear_layers,
    load_model,
    model_class,
    module_map,
    release_model,
    resolve_device,
)
from raymerge.engine.stats.moments import MOMENTS_FILE, Moments, merge_moments, read_moments, write_moments
from raymerge.engine.stats.points import PointInfo, block_names, default_points, expand_points, probe_points

__all__ = [
    "GRAMS_FILE",
    "MOMENTS_FILE",
    "SUMMARY_FILE",
    "Batch",
    "DataSpec",
    "GramLayout",
    "GramSink",
    "LoadedModel",
    "LocalStatsBackend",
    "Moments",
    "PassResult",
    "PassSpec",
    "PointAffine",
    "PointInfo",
    "StatsBackend",
    "StatsError",
    "StatsResult",
    "affine_hook",
    "batch_tokens",
    "block_names",
    "checkpoint_bytes",
    "collect_stats",
    "default_points",
    "expand_points",
    "input_features",
    "linear_layers",
    "load_batches",
    "load_model",
    "merge_moments",
    "model_class",
    "module_map",
    "plan_gram_groups",
    "probe_points",
    "read_matrix",
    "read_moments",
    "release_model",
    "resolve_device",
    "run_pass",
    "shard_batches",
    "write_moments",
]
