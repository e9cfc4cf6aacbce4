"""aisix.proxy.upstream_errors.gateway_error: every transport failure of aisix.upstream.errors
maps to the status and code the README's error table gives, and keeps the transport's message."""
from __future__ import annotations

import pytest

from aisix.proxy.routing import failure_kind
from aisix.proxy.upstream_errors import gateway_error
from aisix.upstream import errors as transport


@pytest.mark.parametrize("cls,status,code,kind", [
    (transport.ConnectError, 502, "upstream_unreachable", "connect_error"),
    (transport.ConnectTimeout, 504, "upstream_timeout", "timeout"),
    (transport.ReadTimeout, 504, "upstream_timeout", "timeout"),
    (transport.RemoteProtocolError, 502, "upstream_malformed_response", 502),
    (transport.ResponseTooLarge, 502, "upstream_response_too_large", 502),
    (transport.StreamBroken, 502, "upstream_stream_broken", 502),
])
def test_each_transport_failure_has_its_status_code_and_retry_kind(cls, status, code, kind):
    err = gateway_error(cls("the upstream did something"))
    assert (err.status, err.code, err.message) == (status, code, "the upstream did something")
    assert err.type == ("timeout_error" if status == 504 else "api_error")
    assert failure_kind(err) == kind  # what routing.retry_on names it


def test_a_subclass_maps_as_its_base():
    class Reset(transport.ConnectError):
        pass
    assert gateway_error(Reset("reset")).code == "upstream_unreachable"


def test_body_too_large_names_the_limit():
    e = transport.body_too_large(1024)
    assert isinstance(e, transport.ResponseTooLarge) and "1024 bytes" in e.message
