"""Merge methods, registered by name (mergekit's names where they exist).

Each family module defines its methods and registers each one on the line below its function,
with its parameters and its memory model; importing this package imports every family, so the
registry is complete. See docs/adding-a-method.md.

* ``task_arithmetic`` — linear, mean, task arithmetic, TIES, DARE, DELLA, breadcrumbs, SCE, consensus
* ``spherical`` — slerp, multislerp, nuslerp, karcher, Model Stock
* ``selection`` — nearswap, Arcee Fusion, RAM, RAM+, passthrough
* ``gram`` — ACTMat, WUDI, RegMean;  ``spectral`` — TSV-M, Iso-C, Iso-CTS (their SVD work in ``polar``)
* ``svc`` — singular value calibration over task arithmetic, TIES, TSV-M, Iso-C, WUDI (``svc_<method>``)

Shared machinery: ``registry`` (names, parameters, ``MethodSpec``), ``chunks`` (row-chunked
sources and the chunked-method adapter), ``masks`` (rank cuts, hashed random masks, sparsifiers),
``precision`` (the dtype and TF32 policy of dense linear algebra).
"""

from __future__ import annotations

from raymerge.engine.methods import gram, selection, spectral, spherical, svc, task_arithmetic  # noqa: F401  (they register)
from raymerge.engine.methods.chunks import ChunkedFn, ChunkSource, InMemorySource, register_chunked
from raymerge.engine.methods.registry import (
    METHODS,
    REQUIRED,
    RESIDENT_SELECT_ELEMENTS,
    Footprint,
    MemoryModel,
    MergeArgs,
    MergeFn,
    MethodSpec,
    Param,
    Scope,
    WorkShape,
    get_method,
    register,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "RESIDENT_SELECT_ELEMENTS",
    "ChunkSource",
    "ChunkedFn",
    "Footprint",
    "MemoryModel",
    "InMemorySource",
    "MergeArgs",
    "MergeFn",
    "MethodSpec",
    "Param",
    "Scope",
    "WorkShape",
    "get_method",
    "register",
    "register_chunked",
]
