"""Every public and internal RPC, fed malformed messages (random bytes, truncated and bit-flipped messages,
random field values at the edges of their ranges), answers only documented status codes, and every service
keeps serving. A seeded generator, bounded in time (FUZZ_SECONDS per service)."""
from __future__ import annotations

import math
import os
import random
import time

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from hmi.client import is_serving
from hmi_client.v1 import gateway_pb2
from hmi_proto.v1 import compute_pb2, knowledge_store_pb2
from services.common.auth.peers import WithMetadata
from tests.helpers import internal_channel

pytestmark = pytest.mark.integration
FUZZ_SECONDS = float(os.environ.get("HMI_FUZZ_SECONDS", "4"))
CALL_TIMEOUT = 2.0
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
SKIPPED = {"Backup"}     # writes a folder at the path it is given: its validation is tested on its own
STRINGS = ["", "a", "t-1", "x" * 300, "\u00e9t\u00e9 \u2603", "../../etc/passwd", "fuzz-t", "fuzz", " ", "\x00"]
INTS = {32: [0, 1, -1, 2**31 - 1, -2**31, 7, 3], 64: [0, 1, -1, 2**63 - 1, -2**63, 12, 100_000]}
UINTS = {32: [0, 1, 2**32 - 1, 500], 64: [0, 1, 2**64 - 1, 2**63, 3]}
FLOATS = [0.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e38, 1e-45]


def random_value(field, rng: random.Random, depth: int):
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return random_message(message_factory.GetMessageClass(field.message_type), rng, depth + 1)
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 64, 300]))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice(UINTS[32])
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice(UINTS[64])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice(INTS[64])
    return rng.choice(INTS[32])


def random_message(cls, rng: random.Random, depth: int = 0):
    message = cls()
    if depth > 2:
        return message
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        if field.is_repeated:
            getattr(message, field.name).extend(random_value(field, rng, depth)
                                                for _ in range(rng.choice([0, 1, 2, 5])))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(random_value(field, rng, depth))
        else:
            setattr(message, field.name, random_value(field, rng, depth))
    return message


def malformed(cls, rng: random.Random) -> bytes:
    """Random bytes, a truncated or bit-flipped message, or a message of random (often out-of-range) fields."""
    valid = random_message(cls, rng).SerializeToString()
    choice = rng.randrange(4)
    if choice == 0:
        return rng.randbytes(rng.choice([1, 3, 16, 200]))
    if choice == 1 and len(valid) > 1:
        return valid[:rng.randrange(1, len(valid))]
    if choice == 2 and valid:
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return valid


def methods(module, service: str):
    for method in module.DESCRIPTOR.services_by_name[service].methods:
        if method.name not in SKIPPED:
            yield method, message_factory.GetMessageClass(method.input_type)


def call(channel: grpc.Channel, method, payloads: list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path)(iter(payloads), timeout=CALL_TIMEOUT):
                pass
        elif method.client_streaming:
            channel.stream_unary(path)(iter(payloads), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(payloads[0], timeout=CALL_TIMEOUT):
                pass
        else:
            channel.unary_unary(path)(payloads[0], timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_malformed_messages_get_documented_codes_and_services_stay_up(services, client):
    logs = sorted((services.data_dir / "logs").glob("*.log"))
    assert len(logs) >= 3, logs                                   # store, compute, gateway
    logged_before = {log: log.stat().st_size for log in logs}     # the services are shared with other tests
    client.build_domain("fuzz", "a line of text\nanother line", split_layer=1, context=2, min_count=1)
    client.register_tenant("fuzz-t", "fuzz", ["a", "b"], seed=1)
    targets = [(services.gateway_addr, [(gateway_pb2, "Gateway"), (gateway_pb2, "Admin")]),
               (services.store_addr, [(knowledge_store_pb2, "KnowledgeStore")]),
               (services.compute_addrs[0], [(compute_pb2, "Compute")])]
    rng = random.Random(1234)
    seen: dict[str, int] = {}
    wrong: list[str] = []
    calls = 0
    for address, surfaces in targets:
        every = [m for module, name in surfaces for m in methods(module, name)]
        ends = time.monotonic() + FUZZ_SECONDS
        # With credentials (the admin token at the gateway, the service secret inside): what is fuzzed is the
        # handling of the message, not the door (tests/test_security.py tests the doors).
        if address == services.gateway_addr:
            channel = grpc.intercept_channel(grpc.insecure_channel(address),
                                             WithMetadata((("authorization", f"Bearer {services.admin_token}"),)))
        else:
            channel = internal_channel(services, address)
        with channel:
            while time.monotonic() < ends:
                for method, cls in every:
                    payloads = [malformed(cls, rng) for _ in range(rng.choice([1, 2, 3]))]
                    code = call(channel, method, payloads)
                    calls += 1
                    seen[code.name] = seen.get(code.name, 0) + 1
                    if code not in DOCUMENTED:
                        wrong.append(f"{method.full_name}: {code.name} for {payloads[0][:40]!r}")
        assert is_serving(address, timeout=5), f"{address} stopped serving"
    print(f"fuzz: {calls} calls, codes {seen}")
    assert not wrong, f"undocumented codes: {wrong[:10]}"
    assert calls > 100 and seen.get("INVALID_ARGUMENT", 0) > 20
    # A caller's message that does not parse is the caller's error: answered, not logged as a fault of ours.
    for log in logs:
        with log.open("rb") as handle:
            handle.seek(logged_before[log])
            text = handle.read().decode("utf-8", "replace")
        assert "Exception iterating requests" not in text, f"{log.name}: {text[-3000:]}"
        assert "Traceback" not in text, f"{log.name} logged a traceback: {text[text.index('Traceback') - 500:][:3000]}"
    client.build_domain("fuzz-after", "", split_layer=0, context=1, min_count=1)   # the fuzz may have deleted
    client.register_tenant("fuzz-after", "fuzz-after", ["a", "b"], seed=2)         # "fuzz" and "fuzz-t"
    assert client.classify("fuzz-after", ["still serving"])[0].label in ("a", "b")
