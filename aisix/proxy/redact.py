"""Secrets never leave the gateway: every configured secret is masked in text it emits.

Provider keys, client keys and admin keys can come back inside upstream error messages (several
providers echo the key they were sent: "Incorrect API key provided: sk-…"). Text that reaches a
client, a log line or a span passes :func:`redact` first.
"""
from __future__ import annotations

import functools
from typing import Iterable

from aisix.config.resources import mask_secret

#: Secrets shorter than this are not searched for (they would match ordinary words).
MIN_SECRET_CHARS = 6


@functools.lru_cache(maxsize=4096)
def byte_masks(secret: str | None) -> tuple[tuple[bytes, bytes], ...]:
    """``((secret, its mask), )`` as bytes, for :func:`redact_bytes`; empty for a secret too short
    to search for (or none). Cached: made once per provider key, not per request."""
    if not secret or len(secret) < MIN_SECRET_CHARS:
        return ()
    return ((secret.encode(), mask_secret(secret).encode()),)


def redact_bytes(data: bytes, masks: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """``data`` (upstream bytes on their way to the client: a body, SSE events) with each secret
    of ``masks`` replaced by its mask. An upstream may echo the key it was sent anywhere in what it
    answers (an error message, a ``response.failed`` event, a field of an event); the bytes are
    relayed as they came unless they hold it. One substring search per secret."""
    for secret, mask in masks:
        if secret in data:
            data = data.replace(secret, mask)
    return data


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with each of ``secrets`` replaced by its mask (``****`` + at most its last four
    characters, :func:`~aisix.config.resources.mask_secret`); longest secrets first, so a key that
    contains another is masked whole."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, mask_secret(secret))
    return text
