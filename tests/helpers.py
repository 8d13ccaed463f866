"""Small helpers for integration tests."""
from __future__ import annotations

import grpc
import pytest


def expect_status(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    """Runs a call that must fail with `code`; returns the message, which must be non-empty."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == code, f"expected {code.name}, got {caught.value.code().name}: {caught.value.details()}"
    assert caught.value.details(), "the status must carry a message a person can act on"
    return caught.value.details()
