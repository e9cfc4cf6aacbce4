"""Gemini embeddings behind ``POST /v1/embeddings``.

Request: ``POST {api_base}/models/{model}:batchEmbedContents`` with one
``{"model", "content": {"parts": [{"text"}]}}`` per input, ``dimensions`` →
``outputDimensionality`` (https://ai.google.dev/api/embeddings#method:-models.batchembedcontents).
``input`` may be a string or an array of strings; token arrays are refused (400: Gemini takes text).

Response ``{"embeddings": [{"values": [...]}]}`` → OpenAI's list
(https://platform.openai.com/docs/api-reference/embeddings/object), floats, or base64 of
little-endian float32 when the client asked ``encoding_format: "base64"`` (the official
``openai`` client does by default). Gemini's batchEmbedContents reports no token count, so
``usage.prompt_tokens`` (= ``total_tokens``) is an estimate: the sum over inputs of
ceil(characters / 4), Google's own rule of thumb ("a token is about 4 characters",
https://ai.google.dev/gemini-api/docs/tokens). A ``usageMetadata.promptTokenCount`` in the
response, if Gemini ever sends one, is used instead.
"""
from __future__ import annotations

import base64
import struct
from dataclasses import dataclass

import orjson

from aisix.errors import invalid_request, upstream_malformed
from aisix.providers.base import ChatResult, Usage
from aisix.providers.translate import as_int
from aisix.upstream.pool import UpstreamRequest


@dataclass(slots=True)
class EmbedRequest(UpstreamRequest):
    """The upstream call, plus what the response translation needs from the client's request."""

    model_id: str = ""
    inputs: int = 0
    estimated_tokens: int = 0
    encode_base64: bool = False


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4): Google's rule of thumb for Gemini tokens."""
    return -(-len(text) // 4)


def batch_embed_request(base_url: str, model_path: str, body: dict, headers: dict[str, str]) -> EmbedRequest:
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid_request("`input` must be a string or a non-empty array of strings for gemini "
                              "(token arrays are not supported)", "invalid_input", "input")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise invalid_request("`encoding_format` must be `float` or `base64`", "invalid_value", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise invalid_request("`dimensions` must be a positive integer", "invalid_type", "dimensions")
    extra = {"outputDimensionality": dims} if dims else {}
    doc = {"requests": [{"model": model_path, "content": {"parts": [{"text": t}]}, **extra} for t in texts]}
    return EmbedRequest(f"{base_url}/{model_path}:batchEmbedContents", headers, orjson.dumps(doc),
                        model_id=model_path.partition("/")[2], inputs=len(texts),
                        estimated_tokens=sum(estimate_tokens(t) for t in texts), encode_base64=fmt == "base64")


def _encode(values: list[float]) -> str:
    """Little-endian float32, base64. 502 for a value float32 cannot hold."""
    try:
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    except (struct.error, OverflowError):
        raise upstream_malformed("upstream gemini sent an embedding value out of float32 range") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def embeddings_to_openai(obj: dict, request: UpstreamRequest | None) -> ChatResult:
    """A ``BatchEmbedContentsResponse`` → OpenAI's embeddings list. Raises 502 on a malformed one."""
    req = request if isinstance(request, EmbedRequest) else None
    embs = obj.get("embeddings")
    if not isinstance(embs, list) or (req is not None and len(embs) != req.inputs):
        raise upstream_malformed("upstream gemini sent an unexpected embeddings body")
    data = []
    for i, e in enumerate(embs):
        values = e.get("values") if isinstance(e, dict) else None
        if not isinstance(values, list):
            raise upstream_malformed("upstream gemini sent an embedding without values")
        if not all(map(_is_number, values)):
            raise upstream_malformed("upstream gemini sent a malformed embedding (a value that is not a number)")
        data.append({"object": "embedding", "index": i,
                     "embedding": _encode(values) if req and req.encode_base64 else values})
    meta = obj.get("usageMetadata")
    prompt = as_int(meta.get("promptTokenCount")) if isinstance(meta, dict) else 0
    prompt = prompt or (req.estimated_tokens if req else 0)
    usage = Usage(prompt, 0, prompt)
    model = req.model_id if req else ""
    doc = {"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
    return ChatResult(orjson.dumps(doc), usage, model or None)
