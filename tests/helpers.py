"""Small helpers for integration tests."""
from __future__ import annotations

import time

import grpc
import pytest


def expect_status(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    """Runs a call that must fail with `code`; returns the message, which must be non-empty."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == code, f"expected {code.name}, got {caught.value.code().name}: {caught.value.details()}"
    assert caught.value.details(), "the status must carry a message a person can act on"
    return caught.value.details()


def retry_until_served(call, *args, timeout: float = 20.0):
    """Calls until a restarted peer answers (channels reconnect with backoff); re-raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
