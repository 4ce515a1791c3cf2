"""Credentials are stripped from every URL raymerge shows or writes."""

from __future__ import annotations

import logging

from raymerge.engine.errors import CheckpointError
from raymerge.engine.urls import RedactingFilter, redact, redact_text, redact_value


def test_redact_userinfo_and_secret_query_parameters():
    assert redact("https://user:pa55@host:8080/m") == "https://***@host:8080/m"
    assert redact("s3://AKIA:topsecret@bucket/m") == "s3://***@bucket/m"
    assert redact("https://host/m?token=abc&rev=main") == "https://host/m?token=***&rev=main"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeef&X-Amz-Expires=60"
    assert redact(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    for clean in ["/data/models/m", "https://host/m", "s3://bucket/m", "user@example.com wrote a=1", "a = b"]:
        assert redact_text(clean) == clean
    text = "models:\n  - model: https://u:p@h/a\n  - model: https://h/b?api_key=k1\n"
    assert redact_text(text) == "models:\n  - model: https://***@h/a\n  - model: https://h/b?api_key=***\n"
    assert redact_value({"m": ["https://u:p@h/a", 3]}) == {"m": ["https://***@h/a", 3]}


def test_error_lines_and_log_records_are_redacted():
    err = CheckpointError("cannot read https://u:p@h/x/config.json", file="https://u:p@h/x")
    assert "u:p" not in str(err) and "https://***@h/x" in str(err)
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "read of %s failed", ("https://u:p@h/a",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "read of https://***@h/a failed"


def test_storage_retry_warnings_are_redacted_without_the_cli(caplog):
    """Ray workers log through the storage logger with no CLI handler: its own filter redacts."""
    from raymerge.engine import storage

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("reset by peer")
        return b"ok"

    with caplog.at_level(logging.WARNING, logger="raymerge.engine.storage"):
        assert storage.with_retries(flaky, "https://u:pw@h/m/config.json", "read") == b"ok"
    assert "https://***@h/m/config.json" in caplog.text and "u:pw" not in caplog.text
