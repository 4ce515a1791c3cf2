"""Planning: from a recipe and checkpoint headers to tensor tasks and a fixed output layout.

``types`` (task specs, the plan), ``layout`` (shards, headers, offsets), ``tasks`` (what runs
on each tensor), ``estimates`` (where tasks compute, declared host and device memory, FLOPs, the budget check), ``build``
(``build_plan``: headers in, plan out). Every output tensor gets a fixed shard and byte offset
before any compute, so tasks can write their bytes in place from any process or node, in any
order, any number of times.
"""

from raymerge.engine.plan.build import build_plan, check_agreement
from raymerge.engine.plan.estimates import Placement, check_budget, fmt_bytes, task_footprint
from raymerge.engine.plan.layout import ShardLayout, lay_out, shard_header, tensor_order
from raymerge.engine.plan.tasks import open_aux
from raymerge.engine.plan.types import DEFAULT_SHARD_BYTES, MergePlan, OutputRef, OutputShard, TensorRef, TensorTask

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "MergePlan",
    "OutputRef",
    "OutputShard",
    "ShardLayout",
    "Placement",
    "TensorRef",
    "TensorTask",
    "build_plan",
    "check_agreement",
    "check_budget",
    "fmt_bytes",
    "task_footprint",
    "lay_out",
    "open_aux",
    "shard_header",
    "tensor_order",
]
