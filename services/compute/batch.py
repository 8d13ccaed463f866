"""The packed batch compute executes: sequences, their tenants, entry layers and offsets.

Like TGI's batch types, one small dataclass with a clear interface: built from the wire (`from_pb`),
turned into the execution order (`plan`), results back to the wire (`to_pb`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hmi_proto.v1 import compute_pb2 as pb
from services.common.codec import decode_tensor, encode_tensor, validate_offsets
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class SequenceSpec:
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    domain_revision: int = 0      # 0: unchecked
    weight: float = 1.0           # the tenant's share in compute's fair execution order (its priority)


@dataclass(frozen=True)
class SequenceFailure:
    """A sequence that could not run for a reason of its own tenant or domain; the rest of the batch ran."""
    code: str                     # gRPC status code name
    message: str
    stale: bool                   # the gateway should resolve the tenant again


@dataclass
class PackedBatch:
    token_ids: np.ndarray          # int32 [total_tokens]
    offsets: np.ndarray            # int64 [n + 1]
    sequences: list[SequenceSpec]
    want_logits: bool = True
    want_embeddings: bool = False

    @property
    def size(self) -> int:
        return len(self.sequences)

    def subset(self, indices: list[int]) -> "PackedBatch":
        """The batch of only these sequences (in this order)."""
        pieces = [self.tokens_of(i) for i in indices]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        return PackedBatch(np.concatenate(pieces).astype(np.int32), offsets, [self.sequences[i] for i in indices],
                           self.want_logits, self.want_embeddings)

    def tokens_of(self, index: int) -> np.ndarray:
        return self.token_ids[self.offsets[index]:self.offsets[index + 1]]

    @classmethod
    def from_pb(cls, request: pb.ForwardRequest, *, num_layers: int, vocab: int, max_positions: int,
                max_tokens: int) -> "PackedBatch":
        token_ids = decode_tensor(request.token_ids, field="token_ids", expect_dtype="int32", expect_ndim=1)
        if len(token_ids) > max_tokens:
            raise InvalidArgument(f"batch of {len(token_ids)} tokens exceeds compute's --max-batch-tokens {max_tokens}")
        offsets = validate_offsets(request.offsets, len(token_ids))
        if len(offsets) - 1 != len(request.sequences):
            raise InvalidArgument(f"{len(offsets) - 1} sequences in offsets but {len(request.sequences)} specs")
        if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
            raise InvalidArgument(f"token ids must lie in [0, {vocab})")
        if np.diff(offsets).max() > max_positions:
            raise InvalidArgument(f"a sequence is longer than the model's {max_positions} positions")
        sequences = []
        for spec in request.sequences:
            if not 0 <= spec.split_layer < num_layers:
                raise InvalidArgument(f"split layer {spec.split_layer} is outside 0..{num_layers - 1}")
            if not spec.tenant_id or spec.adapter_version < 1:
                raise InvalidArgument("every sequence needs a tenant id and an adapter version >= 1")
            if spec.split_layer > 0 and not spec.domain:
                raise InvalidArgument("a sequence with split layer > 0 needs its domain for the PLOT lookup")
            weight = spec.weight if 0 < spec.weight <= 1e6 else 1.0      # unset or absurd: the default share
            sequences.append(SequenceSpec(spec.tenant_id, spec.adapter_version, spec.domain, spec.split_layer,
                                          spec.domain_revision, weight))
        return cls(token_ids, offsets, sequences, request.want_logits, request.want_embeddings)


@dataclass
class BatchResult:
    logits: list[np.ndarray]             # per sequence, in request order
    embeddings: np.ndarray | None        # float32 [n, hidden]
    failures: dict[int, SequenceFailure] = field(default_factory=dict)   # sequence index -> why it did not run

    @classmethod
    def merged(cls, batch: "PackedBatch", ran: list[int], result: "BatchResult | None",
               failures: dict[int, SequenceFailure], hidden: int) -> "BatchResult":
        """The whole batch's result from the sub-batch that ran (`ran`: its sequences' indices) and the failures."""
        logits = [np.empty(0, np.float32)] * batch.size if batch.want_logits else []
        embeddings = np.zeros((batch.size, hidden), np.float32) if batch.want_embeddings else None
        for position, index in enumerate(ran):
            if batch.want_logits:
                logits[index] = result.logits[position]
            if embeddings is not None:
                embeddings[index] = result.embeddings[position]
        return cls(logits, embeddings, failures)

    @classmethod
    def joined(cls, parts: list[tuple[list[int], "BatchResult"]], batch: "PackedBatch", hidden: int) -> "BatchResult":
        """The batch's result from the results of its chunks (`parts`: each chunk's indices and result)."""
        ran = [index for indices, _ in parts for index in indices]
        logits = [row for _, part in parts for row in part.logits]
        embeddings = (np.concatenate([part.embeddings for _, part in parts]) if batch.want_embeddings else None)
        return cls.merged(batch, ran, cls(logits, embeddings), {}, hidden)

    def to_pb(self) -> pb.ForwardResponse:
        response = pb.ForwardResponse()
        for index, failure in sorted(self.failures.items()):
            response.failures.add(index=index, code=failure.code, message=failure.message, stale=failure.stale)
        if self.logits:
            flat = np.concatenate(self.logits).astype(np.float32)
            response.logits.CopyFrom(encode_tensor(flat))
            response.logit_offsets.extend(np.concatenate([[0], np.cumsum([len(x) for x in self.logits])]).tolist())
        if self.embeddings is not None:
            response.embeddings.CopyFrom(encode_tensor(self.embeddings.astype(np.float32)))
        return response
