"""Credentials never leave the process: every URL raymerge shows or writes goes through ``redact``.

A model may be given as ``https://user:secret@host/m`` or ``https://host/m?token=…`` so that
fsspec can authenticate; the URL keeps its credentials where it is used to read, and loses them
wherever it is logged, printed, put in an error line or written into the output (model card,
``mergekit_config.yml``, ``.raymerge/plan.json``). ``redact_text`` does the same to every URL
inside a longer text (a recipe, an error message), and ``RedactingFilter`` to every log record.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# Query parameters that carry a credential (AWS/GCS/Azure signed URLs, bearer tokens, API keys).
SECRET_PARAMS = re.compile(
    r"^(token|access_token|auth|authorization|api[_-]?key|key|secret|password|passwd|pwd|sig|signature|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|sv|se|sp|skoid|sktid)$",
    re.IGNORECASE,
)
# scheme://userinfo@ — the userinfo (user, or user:password) is dropped whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"`]+)@")
# ?name=value or &name=value inside a URL-ish run of text.
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&#\s'\"`]*)")


def redact(url: str) -> str:
    """``url`` without user/password and with secret-looking query parameters masked."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted as ``redact`` does; text without credentials is unchanged."""
    if "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "://" not in text:
        return text

    def mask(m: re.Match[str]) -> str:
        if SECRET_PARAMS.match(m["name"]) and m["value"]:
            return f"{m['sep']}{m['name']}={MASK}"
        return m.group(0)

    return _QUERY_PARAM.sub(mask, text)


def redact_value(obj: Any) -> Any:
    """``obj`` (nested lists/dicts of strings) with every string redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, list | tuple):
        return type(obj)(redact_value(v) for v in obj)
    if isinstance(obj, dict):
        return {k: redact_value(v) for k, v in obj.items()}
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message of every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's own problem to report
            return True
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


__all__ = ["MASK", "RedactingFilter", "redact", "redact_text", "redact_value"]
