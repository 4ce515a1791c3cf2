"""One exception hierarchy for everything raymerge refuses or fails at.

Every error carries the file (or URL) and tensor it concerns where there is one, plus a hint
saying what to do; the CLI prints ``str(err)`` as one line and exits non-zero.
"""

from __future__ import annotations

from raymerge.engine.urls import redact_text


class RaymergeError(Exception):
    """Base class: a message, optional file/tensor context and a hint for the user."""

    exit_code = 2

    def __init__(
        self, message: str, *, file: str | None = None, tensor: str | None = None, hint: str | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [self.message]
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if self.tensor:
            where.append(f"tensor {self.tensor}")
        if where:
            parts.append(f"({', '.join(where)})")
        text = " ".join(parts)
        if self.hint:
            text += f"; {self.hint}"
        return redact_text(text)  # a model URL's credentials never reach an error line


class RecipeError(RaymergeError):
    """The recipe is malformed: unknown key, method or parameter, bad value."""


class CheckpointError(RaymergeError):
    """A checkpoint is unreadable, corrupt, or disagrees with the other models."""


class HeaderError(CheckpointError):
    """A safetensors header is malformed (bad length, JSON, offsets, dtype or shape)."""


class PlanError(RaymergeError):
    """The merge cannot be planned: e.g. a task does not fit the memory budget."""


class OutputError(RaymergeError):
    """The output path is unusable (exists, not writable, disk full, staging mismatch)."""


class TaskError(RaymergeError):
    """A tensor task failed while reading, computing or writing."""


class AlignmentError(RaymergeError):
    """Two models cannot be permutation-aligned: unsupported architecture, or a spec that does not fit."""


class StatsError(RaymergeError):
    """Statistics cannot be collected: bad data file, unknown module name, model that does not fit."""
