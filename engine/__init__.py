"""raymerge.engine: everything that runs on one machine (never imports Ray)."""

from raymerge.engine.errors import RaymergeError

__all__ = ["RaymergeError"]
__version__ = "0.1.0"
