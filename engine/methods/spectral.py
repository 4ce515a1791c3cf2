"""Spectral merges (per-matrix SVD work): TSV-M, Iso-C, Iso-CTS. Registered at import."""

from __future__ import annotations
