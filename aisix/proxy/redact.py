"""Secrets never leave the gateway: every configured secret is masked in text it emits.

Provider keys, client keys and admin keys can come back inside upstream error messages (several
providers echo the key they were sent: "Incorrect API key provided: sk-…"). Text that reaches a
client, a log line or a span passes :func:`redact` first.
"""
from __future__ import annotations

from typing import Iterable

from aisix.config.resources import mask_secret

#: Secrets shorter than this are not searched for (they would match ordinary words).
MIN_SECRET_CHARS = 6


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with each of ``secrets`` replaced by its mask (``****`` + at most its last four
    characters, :func:`~aisix.config.resources.mask_secret`); longest secrets first, so a key that
    contains another is masked whole."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, mask_secret(secret))
    return text
