"""aisix: an OpenAI-compatible AI gateway that streams without buffering and measures every call.

The road a request takes, one module each:
server (aiohttp app, middleware) → proxy (auth → pre-call hooks → provider → post-call hooks)
→ providers (translation) / sse (framing) / upstream (connections) → telemetry (records → batcher → OpenTelemetry).
Configuration lives in store/ and reaches the proxy as an immutable snapshot (snapshot.py).
"""

__version__ = "0.1.0"
