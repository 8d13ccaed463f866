"""The standard gRPC health check (grpc.health.v1.Health/Check) without the grpcio-health-checking package.

Its two messages are built in a private descriptor pool, so this module never clashes with the generated
health stubs that a process may load as well."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FILE = descriptor_pb2.FileDescriptorProto(name="hmi_client/health_check.proto", package="grpc.health.v1",
                                           syntax="proto3")
_request = _FILE.message_type.add(name="HealthCheckRequest")
_request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_response = _FILE.message_type.add(name="HealthCheckResponse")
_status = _response.enum_type.add(name="ServingStatus")
for _number, _name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
    _status.value.add(name=_name, number=_number)
_response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                    type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_FILE)
HealthCheckRequest = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
HealthCheckResponse = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
SERVING = 1


def check(channel: grpc.Channel, service: str = "", timeout: float = 1.0) -> int:
    """The serving status of `service` ("" = the whole server) behind the channel (1 = SERVING)."""
    call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=HealthCheckRequest.SerializeToString,
                               response_deserializer=HealthCheckResponse.FromString)
    return call(HealthCheckRequest(service=service), timeout=timeout).status


def is_serving(address: str, timeout: float = 1.0, *, service: str = "", tls_ca: str | None = None,
               tls_cert: str | None = None, tls_key: str | None = None) -> bool:
    """True when the server at `address` answers SERVING for `service` ("" = the whole server; a name it does
    not know counts as not serving), over TLS with `tls_ca` (`tls_cert` and `tls_key` for a server that
    requires client certificates). The health service needs no credential."""
    from hmi_client.client import open_channel
    try:
        with open_channel(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, options=[]) as channel:
            return check(channel, service, timeout=timeout) == SERVING
    except grpc.RpcError:       # unreachable, or a name the server does not know (NOT_FOUND)
        return False
