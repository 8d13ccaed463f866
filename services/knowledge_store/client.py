"""The knowledge store's wire client: PLOT lookups, adapter and bridge fetches (all streamed).

Compute uses StoreClient; the CLI's client and the bench read lookup streams proxied by the gateway with
the same `lookup_request` / `read_lookup_stream`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from hmi_proto.v1 import knowledge_store_pb2 as pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
from services.common.auth.peers import PeerSecurity
from services.common.codec import encode_tensor, join_chunks
from services.common.errors import InvalidArgument, NotFound, StaleVersion
from services.common.rpc import channel
from services.common.tracing import outgoing_metadata
from services.knowledge_store.fine_tuning_messages import (  # noqa: F401 - for callers of the fine-tuning RPCs
    OWNER_METADATA,
    hyperparameters_of,
)
from services.knowledge_store.position_offsets import apply_chain_offsets  # noqa: F401 - what a row cache adds to raw rows
from services.knowledge_store.tree_stamp import decode_offset_tables


@dataclass
class LookupReply:
    vectors: np.ndarray              # float16 [tokens, hidden]
    hit_depth_counts: list[int]
    split_layer: int = 0
    bridge_revision: int = 0         # the domain bridge to apply to these rows (0: none)
    # raw lookups (a row cache): rows without position offsets, and what it takes to apply them
    stamp: str = ""
    context: int = 0
    token_depths: np.ndarray | None = None    # uint8 [tokens]
    token_owners: np.ndarray | None = None    # uint8 [tokens]: chain link of the serving node
    learning: bool = False                    # the domain learns from traffic
    offset_tables: dict[int, np.ndarray] = field(default_factory=dict)   # present when not at known_stamp


class StoreClient:
    def __init__(self, address: str, timeout: float = 30.0, security: PeerSecurity | None = None) -> None:
        """`security`: TLS and the service secret the store requires (None: plaintext, no secret)."""
        self.address = address
        self.timeout = timeout
        self.channel = channel(address, security=security, iterated_streams=True)
        self.stub = pb_grpc.KnowledgeStoreStub(self.channel)

    def lookup(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray,
               timeout: float | None = None, domain_revision: int = 0, raw: bool = False,
               known_stamp: str = "", context_tokens: np.ndarray | None = None) -> LookupReply:
        """NotFound / StaleVersion when the domain is gone or is not the revision the caller resolved.
        `raw`: rows without position offsets plus what applying them takes (tree_stamp.py); `context_tokens`: per
        sequence, leading tokens that are left context only (no rows for them)."""
        request = lookup_request(domain, token_ids, offsets)
        if context_tokens is not None:
            request.context_tokens.extend(np.asarray(context_tokens).tolist())
        request.domain_revision = domain_revision
        request.raw_rows = raw
        request.known_stamp = known_stamp
        with resolved_errors():
            return read_lookup_stream(self.stub.Lookup(request, timeout=timeout or self.timeout,
                                                          metadata=outgoing_metadata()))

    def plot_rows(self, domain: str, windows: list[np.ndarray], first_positions: list[int],
                  context_tokens: list[int], timeout: float | None = None) -> list[np.ndarray]:
        """Layer-L rows (fp16) of each window's tokens after its first `context_tokens` (left context only)."""
        offsets = np.concatenate([[0], np.cumsum([len(w) for w in windows])]).astype(np.int64)
        request = lookup_request(domain, np.concatenate(windows), offsets)
        request.first_positions.extend(first_positions)
        request.context_tokens.extend(context_tokens)
        reply = read_lookup_stream(self.stub.Lookup(request, timeout=timeout or self.timeout,
                                                          metadata=outgoing_metadata()))
        kept = np.concatenate([[0], np.cumsum([len(w) - c for w, c in zip(windows, context_tokens)])])
        return [reply.vectors[kept[i]:kept[i + 1]] for i in range(len(windows))]

    def record_traffic(self, domain: str, domain_revision: int, paths: np.ndarray, owners: np.ndarray,
                       counts: np.ndarray, timeout: float | None = None) -> str:
        """Reports tokens a row cache served; returns the tree's current stamp (NotFound / StaleVersion when the
        domain is gone or rebuilt)."""
        request = pb.RecordTrafficRequest(domain=domain, domain_revision=domain_revision,
                                          paths=encode_tensor(paths.astype(np.int32)),
                                          owners=owners.astype(np.uint8).tobytes(), counts=counts.tolist())
        with resolved_errors():
            return self.stub.RecordTraffic(request, timeout=timeout or self.timeout,
                                           metadata=outgoing_metadata()).tree_stamp

    def get_adapter(self, tenant_id: str, version: int, timeout: float | None = None) -> bytes:
        """NotFound (deleted) or StaleVersion (replaced) when `version` is no longer the tenant's."""
        with resolved_errors():
            stream = self.stub.GetAdapter(pb.GetAdapterRequest(tenant_id=tenant_id, version=version),
                                          timeout=timeout or self.timeout, metadata=outgoing_metadata())
            return join_chunks(chunk.data for chunk in stream)

    def get_bridge(self, domain: str, revision: int, timeout: float | None = None) -> bytes:
        """NotFound (no bridge, domain gone) or StaleVersion (rebuilt) when `revision` is no longer the domain's."""
        with resolved_errors():
            stream = self.stub.GetBridge(pb.GetBridgeRequest(domain=domain, revision=revision),
                                         timeout=timeout or self.timeout, metadata=outgoing_metadata())
            return join_chunks(chunk.data for chunk in stream)

    def changes(self, after: int, wait: float = 0.0, timeout: float = 10.0) -> pb.ListChangesResponse:
        """The change log after a revision (a long poll with `wait`); no follower id: writes never wait for it."""
        return self.stub.ListChanges(pb.ListChangesRequest(after_revision=after, wait_ms=int(wait * 1e3)),
                                     timeout=timeout + wait)

    def close(self) -> None:
        self.channel.close()


class resolved_errors:
    """Context manager: the store's NOT_FOUND / FAILED_PRECONDITION become NotFound / StaleVersion, errors of the
    one tenant or domain (its sequences fail alone); other statuses (the store down, ...) pass unchanged."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(error.details()) from None
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise StaleVersion(error.details()) from None
        return False


def lookup_request(domain: str, token_ids: np.ndarray, offsets: np.ndarray) -> pb.LookupRequest:
    return pb.LookupRequest(domain=domain, token_ids=encode_tensor(token_ids.astype(np.int32)),
                            offsets=np.asarray(offsets).tolist())


def read_lookup_stream(stream) -> LookupReply:
    """A header, then the fp16 rows in ordered chunks (from the store, or proxied by the gateway)."""
    header = None
    buffer = bytearray()
    tables = bytearray()
    for message in stream:
        item = message.WhichOneof("item")
        if item == "header":
            header = message.header
        elif item == "offsets_chunk":
            tables += message.offsets_chunk
        else:
            buffer += message.chunk
    if header is None or header.dtype != "float16":
        raise InvalidArgument("store answered a lookup without a float16 header")
    shape = tuple(header.shape)
    vectors = np.frombuffer(bytes(buffer), dtype="<f2")
    if vectors.size != int(np.prod(shape)):
        raise InvalidArgument(f"store sent {vectors.size} values for shape {shape}")
    reply = LookupReply(vectors.reshape(shape), list(header.hit_depth_counts), header.split_layer,
                        header.bridge_revision, header.tree_stamp, header.context)
    if header.tree_stamp:
        reply.token_depths = np.frombuffer(header.token_depths, dtype=np.uint8)
        reply.token_owners = np.frombuffer(header.token_owners, dtype=np.uint8)
        reply.learning = header.learning
        if len(reply.token_depths) != shape[0] or len(reply.token_owners) != shape[0]:
            raise InvalidArgument(f"store sent {len(reply.token_depths)} depths and {len(reply.token_owners)} owners "
                                  f"for {shape[0]} rows")
        reply.offset_tables = decode_offset_tables(bytes(tables))
    return reply
