"""HMI's Python client: grpcio and protobuf only (no torch). `HMIClient` wraps the Gateway and Admin services;
failures are raised as the typed exceptions of `hmi_client.errors`; `hmi_client.v1` holds the raw stubs."""
from hmi_client.client import Generation, GenerationStream, HMIClient, Prediction
from hmi_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    HMIError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from hmi_client.health import is_serving

__all__ = ["HMIClient", "Prediction", "Generation", "GenerationStream", "is_serving", "HMIError", "Cancelled",
           "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists", "PermissionDenied",
           "ResourceExhausted", "FailedPrecondition", "Unimplemented", "Internal", "Unavailable", "Unauthenticated"]
