"""Gram-family merges (streaming reduction over experts): ACTMat, WUDI, RegMean solve."""

from __future__ import annotations
