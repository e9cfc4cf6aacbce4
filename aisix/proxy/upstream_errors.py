"""The one map from transport failures (:mod:`aisix.upstream.errors`) to the client's error.

=====================  ======  ===============================  ======================
transport error        status  code                             router's failure kind
=====================  ======  ===============================  ======================
ConnectError           502     ``upstream_unreachable``         ``connect_error``
ConnectTimeout         504     ``upstream_timeout``             ``timeout``
ReadTimeout            504     ``upstream_timeout``             ``timeout``
RemoteProtocolError    502     ``upstream_malformed_response``  502
ResponseTooLarge       502     ``upstream_response_too_large``  502
StreamBroken           502     ``upstream_stream_broken``       502
=====================  ======  ===============================  ======================
"""
from __future__ import annotations

from aisix.errors import (
    GatewayError,
    upstream_malformed,
    upstream_stream_broken,
    upstream_timeout,
    upstream_too_large,
    upstream_unreachable,
)
from aisix.upstream import errors as transport

_MAP = {transport.ConnectError: upstream_unreachable, transport.ConnectTimeout: upstream_timeout,
        transport.ReadTimeout: upstream_timeout, transport.RemoteProtocolError: upstream_malformed,
        transport.ResponseTooLarge: upstream_too_large, transport.StreamBroken: upstream_stream_broken}


def gateway_error(e: transport.UpstreamError) -> GatewayError:
    """The OpenAI-shaped error a transport failure ends the request with (the table above); its
    message is the transport's, which names no secret."""
    for cls in type(e).__mro__:
        make = _MAP.get(cls)
        if make is not None:
            return make(e.message)
    return upstream_unreachable(e.message)
