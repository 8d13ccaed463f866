"""gRPC surface of the knowledge store: validation of wire input, streaming, records to messages, error mapping."""
from __future__ import annotations

import math
import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from hmi_client.v1 import fine_tuning_pb2 as ft
from hmi_client.v1 import tensor_pb2
from hmi_proto.v1 import knowledge_store_pb2 as pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
from services.common.auth.api_keys import check_tenant_id
from services.common.codec import CHUNK_BYTES, decode_tensor, split_chunks, validate_offsets
from services.common.errors import Cancelled, InvalidArgument, quoted
from services.common.rpc import handles_errors, handles_stream_errors
from services.knowledge_store.access_records import KeyRecord, LimitsRecord
from services.knowledge_store.bridge_distillation import DistillSettings
from services.knowledge_store.domain_adaptation import AdaptSettings
from services.knowledge_store.fine_tuning_messages import (
    OWNER_METADATA,
    checkpoints_to_pb,
    event_of,
    event_to_pb,
    file_to_pb,
    hyperparameters_of,
    job_to_pb,
)
from services.knowledge_store.limit_shares import MAX_REPORTED_TENANTS, LimitShares
from services.knowledge_store.metrics import BYTES_STREAMED, LOOKUP_TOKENS, LOOKUPS
from services.knowledge_store.records import AdaptReport, BridgeReport, DomainRecord, DomainStatus, TenantRecord
from services.knowledge_store.store import CHANGES_PER_REPLY, KnowledgeStore
from services.knowledge_store.tree_stamp import encode_offset_tables

MAX_POLL_MS = 5000          # the longest a ListChanges long poll is held


def domain_to_pb(record: DomainStatus) -> pb.Domain:
    return pb.Domain(
        spec=pb.DomainSpec(name=record.name, parent=record.parent, split_layer=record.split_layer,
                           context=record.context, min_count=record.min_count, budget_bytes=record.budget_bytes,
                           learn_threshold=record.learn_threshold, no_position_offsets=not record.position_offsets,
                           model=record.model),
        model=record.model, hidden_size=record.hidden_size, nodes=record.nodes,
        nodes_per_depth=record.nodes_per_depth, plot_bytes=record.plot_bytes,
        corpus_sequences=record.corpus_sequences, corpus_tokens=record.corpus_tokens,
        built_at=record.built_at, lower_model=record.lower_model,
        budget_bytes=record.effective_budget, learn_threshold=record.effective_threshold,
        materialized_nodes=record.materialized, pruned_nodes=record.pruned,
        pending_contexts=record.traffic_entries, recent_hit_depths=record.recent_hit_depths,
        adapt=adapt_to_pb(record.adapt), position_offsets=record.position_offsets, revision=record.revision,
        bridge=bridge_to_pb(record.bridge))


def bridge_to_pb(bridge: BridgeReport | None) -> pb.BridgeReport | None:
    if bridge is None:
        return None
    return pb.BridgeReport(revision=bridge.revision, heads=bridge.heads, head_dim=bridge.head_dim, ffn=bridge.ffn,
                           steps=bridge.steps, sequences=bridge.sequences, tokens=bridge.tokens,
                           loss_before=bridge.loss_before, loss_after=bridge.loss_after, seconds=bridge.seconds,
                           cost_in_layers=bridge.cost_in_layers, bytes=bridge.bytes)


def bridge_settings(spec: pb.DomainSpec) -> DistillSettings | None:
    """The spec's bridge settings (unset fields: defaults); None when the spec sets none."""
    if not spec.HasField("bridge"):
        return None
    wire = spec.bridge
    numbers = (wire.steps, wire.batch_size, wire.heads, wire.head_dim, wire.ffn, wire.max_tokens)
    if any(value < 0 for value in numbers) or not wire.learning_rate >= 0:
        raise InvalidArgument("bridge steps, batch size, heads, head width, feed-forward width, token cap and "
                              "learning rate must be >= 0 (0 = default)")
    defaults = DistillSettings()
    return DistillSettings(steps=wire.steps or defaults.steps, batch_size=wire.batch_size or defaults.batch_size,
                           learning_rate=wire.learning_rate or defaults.learning_rate,
                           heads=wire.heads or defaults.heads, head_dim=wire.head_dim or defaults.head_dim,
                           ffn=wire.ffn or defaults.ffn, max_tokens_total=wire.max_tokens or defaults.max_tokens_total,
                           seed=wire.seed)


def bridge_revision(record: DomainRecord) -> int:
    return record.bridge.revision if record.bridge is not None else 0


def adapt_to_pb(adapt: AdaptReport | None) -> pb.AdaptReport | None:
    if adapt is None:
        return None
    return pb.AdaptReport(steps=adapt.steps, corpus_sequences=adapt.corpus_sequences, base_loss=adapt.base_loss,
                          adapted_loss=adapt.adapted_loss, seconds=adapt.seconds)


def tenant_to_pb(record: TenantRecord, limits: LimitsRecord | None = None) -> pb.Tenant:
    return pb.Tenant(
        spec=pb.TenantSpec(tenant_id=record.tenant_id, domain=record.domain, labels=record.labels,
                           rank=record.rank, seed=record.seed, model=record.model),
        adapter_version=record.adapter_version, adapter_bytes=record.adapter_bytes, rank=record.rank,
        targets=record.targets, layers=record.layers, updated_at=record.updated_at,
        split_layer=record.split_layer, limits=limits_to_pb(limits) if limits is not None else None)


def limits_to_pb(limits: LimitsRecord) -> pb.TenantLimits:
    return pb.TenantLimits(tenant_id=limits.tenant_id, rps=limits.rps, tps=limits.tps,
                           max_concurrent=limits.max_concurrent, max_queued=limits.max_queued,
                           priority=limits.priority)


def key_to_pb(record: KeyRecord) -> pb.ApiKey:
    """What anyone may see of a key: never its salt or hash."""
    return pb.ApiKey(id=record.id, tenants=record.tenants, tenant_admin=record.tenant_admin, domains=record.domains,
                     description=record.description, created_at=record.created_at, expires_at=record.expires_at,
                     revoked_at=record.revoked_at, rps=record.rps, tps=record.tps,
                     max_concurrent=record.max_concurrent)


def read_spec_and_payload(requests, spec_field: str, chunk_field: str, limit: int, extra_field: str = ""):
    """Client streams of the form: one spec message (and optionally one `extra_field`), then payload chunks."""
    spec, extra, payload = None, None, bytearray()
    for request in requests:
        item = request.WhichOneof("item")
        if item == spec_field:
            if spec is not None:
                raise InvalidArgument(f"the stream must carry exactly one {spec_field}")
            spec = getattr(request, spec_field)
        elif extra_field and item == extra_field:
            extra = getattr(request, extra_field)
        elif item == chunk_field:
            if spec is None:
                raise InvalidArgument(f"send the {spec_field} before any {chunk_field}")
            payload += getattr(request, chunk_field)
            if len(payload) > limit:
                raise InvalidArgument(f"{chunk_field} payload exceeds the limit of {limit} bytes")
    if spec is None:
        raise InvalidArgument(f"the stream carried no {spec_field}")
    if extra_field:
        return spec, extra, bytes(payload)
    return spec, bytes(payload)


def decode_corpus(corpus_bytes: bytes) -> str:
    try:
        return corpus_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"the corpus is not UTF-8 text: {error}") from error


def adapt_settings(wire: pb.AdaptSettings | None, split_layer: int) -> AdaptSettings:
    settings = AdaptSettings(split_layer)
    if wire is not None:
        if wire.steps < 0 or wire.batch_size < 0:
            raise InvalidArgument("adaptation steps and batch size must be >= 0 (0 = default)")
        settings.steps = wire.steps or settings.steps
        settings.batch_size = wire.batch_size or settings.batch_size
        settings.learning_rate = wire.learning_rate or settings.learning_rate
        settings.seed = wire.seed
    if not 0 < settings.learning_rate <= 1:    # also refuses NaN
        raise InvalidArgument(f"learning rate {settings.learning_rate} is outside (0, 1]")
    return settings


def stream_progress(work, context, stopping: threading.Event, thread_name: str) -> Iterator[pb.BuildDomainProgress]:
    """Runs a long store job in a thread and streams its progress; the last message carries the domain.

    The job gives up (its next progress report raises Cancelled, before anything is written) when the caller
    goes away (cancelled, deadline passed, connection lost) or the store is stopping."""
    updates: queue.Queue = queue.Queue()
    outcome: dict = {}
    gone = threading.Event()
    context.add_callback(gone.set)       # runs when the RPC ends for any reason

    def report(update) -> None:
        if gone.is_set() or stopping.is_set():
            raise Cancelled("the caller went away or the store is stopping; nothing was written")
        updates.put(update)

    def run() -> None:
        try:
            outcome["record"] = work(report)
        except BaseException as error:  # noqa: BLE001 - re-raised in the RPC thread below
            outcome["error"] = error
        finally:
            updates.put(None)

    threading.Thread(target=run, name=thread_name, daemon=True).start()
    while (update := updates.get()) is not None:
        if context.is_active():
            yield update
    if "error" in outcome:
        raise outcome["error"]
    yield pb.BuildDomainProgress(stage="done", done=1, total=1, domain=domain_to_pb(outcome["record"]))


def window_fields(request, offsets: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """first_positions and context_tokens: absent, or one non-negative value per sequence."""
    sequences = len(offsets) - 1
    fields = []
    for name in ("first_positions", "context_tokens"):
        values = list(getattr(request, name))
        if not values:
            fields.append(None)
            continue
        if len(values) != sequences or min(values) < 0:
            raise InvalidArgument(f"{name} needs one non-negative value per sequence ({sequences}), got {values[:8]}")
        fields.append(np.asarray(values, dtype=np.int64))
    first, skip = fields
    if skip is not None and (skip >= np.diff(offsets)).any():
        raise InvalidArgument("context_tokens must leave at least one token of each sequence to look up")
    return first, skip


def _owner(context) -> str:
    return dict(context.invocation_metadata()).get(OWNER_METADATA, "") or "admin"


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


class KnowledgeStoreServicer(pb_grpc.KnowledgeStoreServicer):
    def __init__(self, store: KnowledgeStore) -> None:
        self.store = store
        self.limit_shares = LimitShares()

    def _settle(self) -> None:
        """After a write: wait (bounded) until every live gateway has read the change log past it, so the
        caller's next request through any gateway sees the write."""
        self.store.followers.wait_for(self.store.followers.revision)

    @handles_stream_errors
    def BuildDomain(self, request_iterator, context) -> Iterator[pb.BuildDomainProgress]:
        spec, corpus_bytes = read_spec_and_payload(request_iterator, "spec", "corpus_chunk",
                                                   self.store.settings.max_corpus_bytes)
        corpus = decode_corpus(corpus_bytes)
        split_layer = self.store.requested_split_layer(spec.name, spec.split_layer, spec.model)
        context_depth = self.store.requested_context(spec.name, spec.context, spec.model)
        self.store.validate_domain_spec(spec.name, spec.parent, split_layer, context_depth, spec.min_count,
                                        spec.budget_bytes, spec.learn_threshold, spec.model)
        bridge = bridge_settings(spec)
        self.store.bridge_settings(spec.model, split_layer, spec.no_bridge, bridge)   # refuse before the work

        def work(progress):
            return self.store.build_domain(
                spec.name, corpus, parent=spec.parent, split_layer=split_layer, context=context_depth,
                min_count=spec.min_count, budget_bytes=spec.budget_bytes, learn_threshold=spec.learn_threshold,
                position_offsets=not spec.no_position_offsets, model=spec.model, request_id=spec.request_id,
                no_bridge=spec.no_bridge, bridge=bridge,
                progress=lambda stage, done, total, loss=0.0: progress(pb.BuildDomainProgress(
                    stage=stage, done=done, total=total, loss=loss)))
        for update in stream_progress(work, context, self.store.stopping, f"build-{spec.name}"):
            if update.stage == "done":
                self._settle()
            yield update

    @handles_stream_errors
    def AdaptDomain(self, request_iterator, context) -> Iterator[pb.BuildDomainProgress]:
        spec, wire, corpus_bytes = read_spec_and_payload(request_iterator, "spec", "corpus_chunk",
                                                         self.store.settings.max_corpus_bytes, "settings")
        corpus = decode_corpus(corpus_bytes)
        settings = adapt_settings(wire, spec.split_layer)

        def work(progress):
            return self.store.adapt_domain(
                spec.name, corpus, parent=spec.parent, split_layer=spec.split_layer, settings=settings,
                model=spec.model, request_id=spec.request_id,
                progress=lambda stage, done, total, loss: progress(pb.BuildDomainProgress(
                    stage=stage, done=done, total=total, loss=loss)))
        for update in stream_progress(work, context, self.store.stopping, f"adapt-{spec.name}"):
            if update.stage == "done":
                self._settle()
            yield update

    @handles_errors
    def GetDomain(self, request, context) -> pb.Domain:
        return domain_to_pb(self.store.get_domain(request.name))

    @handles_errors
    def ListDomains(self, request, context) -> pb.ListDomainsResponse:
        return pb.ListDomainsResponse(domains=[domain_to_pb(r) for r in self.store.list_domains()])

    @handles_errors
    def DeleteDomain(self, request, context) -> pb.DeleteDomainResponse:
        self.store.delete_domain(request.name, request.request_id)
        self._settle()
        return pb.DeleteDomainResponse()

    @handles_stream_errors
    def Lookup(self, request, context) -> Iterator[pb.LookupResponse]:
        token_ids = decode_tensor(request.token_ids, field="token_ids", expect_dtype="int32", expect_ndim=1)
        offsets = validate_offsets(request.offsets, len(token_ids))
        first, skip = window_fields(request, offsets)
        raw = request.raw_rows
        rows = len(token_ids) - (int(skip.sum()) if skip is not None else 0)
        slices = self.store.lookup_slices(request.domain, token_ids, offsets, first_positions=first,
                                          context_tokens=skip, domain_revision=request.domain_revision,
                                          raw=raw, known_stamp=request.known_stamp[:64])
        LOOKUPS.inc()
        depth_counts = None
        depths, owners = [], []
        stamp, learning = "", False
        for record, result in slices:   # a slice at a time: a large answer is never held whole
            if depth_counts is None:
                depth_counts = np.zeros(record.context, dtype=np.int64)
                stamp, learning = result.stamp, result.learning
                yield pb.LookupResponse(header=pb.LookupHeader(dtype="float16", shape=[rows, record.hidden_size],
                                                               split_layer=record.split_layer,
                                                               bridge_revision=bridge_revision(record),
                                                               tree_stamp=stamp, context=record.context))
                if result.offset_tables:
                    for chunk in split_chunks(encode_offset_tables(result.offset_tables)):
                        BYTES_STREAMED.labels("Lookup").inc(len(chunk))
                        yield pb.LookupResponse(offsets_chunk=chunk)
            depth_counts += np.bincount(result.hit_depths, minlength=record.context + 1)[1:record.context + 1]
            if raw:
                depths.append(result.hit_depths.astype(np.uint8))
                owners.append(result.owners.astype(np.uint8))
            LOOKUP_TOKENS.inc(len(result.vectors))
            for chunk in split_chunks(result.vectors.tobytes()):
                BYTES_STREAMED.labels("Lookup").inc(len(chunk))
                yield pb.LookupResponse(chunk=chunk)
        # The header again, now with the hit depths of every slice (readers keep the last header).
        yield pb.LookupResponse(header=pb.LookupHeader(
            dtype="float16", shape=[rows, record.hidden_size], split_layer=record.split_layer,
            hit_depth_counts=depth_counts.tolist(), bridge_revision=bridge_revision(record), tree_stamp=stamp,
            context=record.context, token_depths=b"".join(d.tobytes() for d in depths),
            token_owners=b"".join(o.tobytes() for o in owners), learning=learning))

    @handles_errors
    def RecordTraffic(self, request, context) -> pb.RecordTrafficResponse:
        paths = decode_tensor(request.paths, field="paths", expect_dtype="int32", expect_ndim=2)
        owners = np.frombuffer(request.owners, dtype=np.uint8)
        counts = np.asarray(request.counts, dtype=np.uint64).astype(np.int64)
        stamp = self.store.record_cached_hits(request.domain, request.domain_revision, paths, owners, counts)
        return pb.RecordTrafficResponse(tree_stamp=stamp)

    @handles_errors
    def PutTenant(self, request_iterator, context) -> pb.Tenant:
        spec, adapter = read_spec_and_payload(request_iterator, "spec", "adapter_chunk",
                                              self.store.settings.max_adapter_bytes)
        record = self.store.put_tenant(spec.tenant_id, spec.domain, list(spec.labels), adapter or None,
                                       rank=spec.rank, seed=spec.seed, model=spec.model, request_id=spec.request_id,
                                       has_adapter=spec.has_adapter)
        self._settle()
        return tenant_to_pb(record)

    @handles_errors
    def GetTenant(self, request, context) -> pb.Tenant:
        record = self.store.get_tenant(request.tenant_id)
        return tenant_to_pb(record, self.store.access.limits(record.tenant_id))

    @handles_errors
    def ListTenants(self, request, context) -> pb.ListTenantsResponse:
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        records, total = self.store.list_tenants(request.domain, request.limit, request.after)
        limits = self.store.access.limits_of([r.tenant_id for r in records])
        return pb.ListTenantsResponse(tenants=[tenant_to_pb(r, limits[r.tenant_id]) for r in records], total=total)

    @handles_errors
    def DeleteTenant(self, request, context) -> pb.DeleteTenantResponse:
        self.store.delete_tenant(request.tenant_id, request.request_id)
        self._settle()
        return pb.DeleteTenantResponse()

    @handles_stream_errors
    def GetAdapter(self, request, context) -> Iterator[tensor_pb2.Chunk]:
        _record, data = self.store.get_adapter(request.tenant_id, request.version)
        for chunk in split_chunks(data, CHUNK_BYTES):
            BYTES_STREAMED.labels("GetAdapter").inc(len(chunk))
            yield tensor_pb2.Chunk(data=chunk)

    @handles_stream_errors
    def GetBridge(self, request, context) -> Iterator[tensor_pb2.Chunk]:
        _record, data = self.store.get_bridge(request.domain, request.revision)
        for chunk in split_chunks(data, CHUNK_BYTES):
            BYTES_STREAMED.labels("GetBridge").inc(len(chunk))
            yield tensor_pb2.Chunk(data=chunk)

    @handles_errors
    def ShareLimits(self, request, context) -> pb.ShareLimitsResponse:
        if not request.gateway_id or len(request.gateway_id) > 128:
            raise InvalidArgument("gateway_id must be 1-128 characters")
        if len(request.demand) > MAX_REPORTED_TENANTS:
            raise InvalidArgument(f"a report names at most {MAX_REPORTED_TENANTS} tenants, this one "
                                  f"{len(request.demand)}")
        demand: dict[str, float] = {}
        for entry in request.demand:
            rate = entry.requests_per_second
            if not math.isfinite(rate) or rate < 0 or rate > 1e9:
                raise InvalidArgument(f"tenant {quoted(entry.tenant_id)}: requests_per_second must be a finite "
                                      f"number in [0, 1e9]")
            demand[entry.tenant_id] = demand.get(entry.tenant_id, 0.0) + rate
        gateways, shares = self.limit_shares.report(request.gateway_id, demand)
        return pb.ShareLimitsResponse(gateways=gateways, shares=[pb.TenantShare(tenant_id=tenant, share=share)
                                                                 for tenant, share in shares.items()])

    @handles_errors
    def ListChanges(self, request, context) -> pb.ListChangesResponse:
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        limit = request.limit or CHANGES_PER_REPLY
        feed = self.store.changes_after(request.after_revision, limit)
        wait = min(request.wait_ms, MAX_POLL_MS) / 1e3 if feed.complete and not feed.changes else 0.0
        self.store.followers.poll(request.follower, request.after_revision, wait, feed.revision)
        if wait:
            feed = self.store.changes_after(request.after_revision, limit)
        return pb.ListChangesResponse(
            store_id=feed.store_id, revision=feed.revision, complete=feed.complete,
            changes=[pb.Change(revision=revision, kind=kind, name=name) for revision, kind, name in feed.changes])

    @handles_errors
    def Backup(self, request, context) -> pb.BackupResponse:
        if not request.path or not Path(request.path).is_absolute() or "\0" in request.path:
            raise InvalidArgument(f"path {quoted(request.path)} must be an absolute path (without NUL): a new folder "
                                  f"on the store's machine")
        copy = self.store.backup(Path(request.path))
        return pb.BackupResponse(path=copy["path"], bytes=int(copy["bytes"]), revision=int(copy["revision"]),
                                 seconds=copy["seconds"])

    # ---- API keys and tenant limits (access_records.py) -------------------------------------------

    @handles_errors
    def CreateKey(self, request, context) -> pb.CreateKeyResponse:
        record, secret = self.store.access.create_key(list(request.tenants), tenant_admin=request.tenant_admin,
                                                      domains=list(request.domains),
                                                      expires_in=request.expires_in_seconds,
                                                      description=request.description, rps=request.rps,
                                                      tps=request.tps, max_concurrent=request.max_concurrent)
        self._settle()
        return pb.CreateKeyResponse(key=key_to_pb(record), secret=secret)

    @handles_errors
    def ListKeys(self, request, context) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[key_to_pb(r) for r in self.store.access.list_keys()])

    @handles_errors
    def RevokeKey(self, request, context) -> pb.ApiKey:
        record = self.store.access.revoke_key(request.id)
        self._settle()
        return key_to_pb(record)

    @handles_errors
    def GetKeyVerifier(self, request, context) -> pb.KeyVerifier:
        record = self.store.access.get_key(request.id)
        verifier = record.verifier()
        return pb.KeyVerifier(key=key_to_pb(record), salt=verifier.salt, hash=verifier.hash, n=verifier.n,
                              r=verifier.r, p=verifier.p)

    @handles_errors
    def SetTenantLimits(self, request, context) -> pb.TenantLimits:
        wire = request.limits
        record = self.store.access.set_limits(LimitsRecord(
            tenant_id=wire.tenant_id, rps=wire.rps, tps=wire.tps, max_concurrent=wire.max_concurrent,
            max_queued=wire.max_queued, priority=wire.priority))
        self._settle()
        return limits_to_pb(record)

    @handles_errors
    def GetTenantLimits(self, request, context) -> pb.TenantLimits:
        return limits_to_pb(self.store.access.limits(check_tenant_id(request.tenant_id)))

    # ---- fine-tuning: files and jobs (the gateway's callers), leases (compute replicas) ----------

    @handles_errors
    def UploadFile(self, request_iterator, context) -> ft.TrainingFile:
        spec, data = read_spec_and_payload(request_iterator, "spec", "data", self.store.settings.max_file_bytes)
        return file_to_pb(self.store.put_file(spec.filename, spec.purpose, data, _owner(context), spec.request_id))

    @handles_errors
    def GetFile(self, request, context) -> ft.TrainingFile:
        return file_to_pb(self.store.get_file(request.id))

    @handles_stream_errors
    def GetFileContent(self, request, context) -> Iterator[tensor_pb2.Chunk]:
        for chunk in split_chunks(self.store.file_content(request.id), CHUNK_BYTES):
            yield tensor_pb2.Chunk(data=chunk)

    @handles_errors
    def ListFiles(self, request, context) -> ft.ListFilesResponse:
        return ft.ListFilesResponse(files=[file_to_pb(f) for f in self.store.list_files()])

    @handles_errors
    def DeleteFile(self, request, context) -> ft.TrainingFile:
        return file_to_pb(self.store.delete_file(request.id))

    @handles_errors
    def CreateJob(self, request, context) -> ft.FineTuningJob:
        return job_to_pb(self.store.create_job(
            request.tenant_id, request.training_file, validation_file=request.validation_file,
            hyperparameters=hyperparameters_of(request.hyperparameters), seed=request.seed,
            new_tenant_id=request.new_tenant_id, owner=_owner(context), request_id=request.request_id))

    @handles_errors
    def GetJob(self, request, context) -> ft.FineTuningJob:
        return job_to_pb(self.store.get_job(request.id))

    @handles_errors
    def ListJobs(self, request, context) -> ft.ListJobsResponse:
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        jobs = self.store.list_jobs(request.tenant_id, request.limit + 1 if request.limit else 0, request.after)
        more = bool(request.limit) and len(jobs) > request.limit
        return ft.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs[:request.limit or None]], has_more=more)

    @handles_errors
    def CancelJob(self, request, context) -> ft.FineTuningJob:
        return job_to_pb(self.store.cancel_job(request.id))

    @handles_stream_errors
    def ListJobEvents(self, request, context) -> Iterator[ft.FineTuningEvent]:
        for event in self.store.job_events(request.id, request.after):
            yield event_to_pb(event)

    @handles_errors
    def ListCheckpoints(self, request, context) -> ft.ListCheckpointsResponse:
        return checkpoints_to_pb(self.store.get_job(request.id))

    @handles_errors
    def ClaimJob(self, request, context) -> pb.ClaimJobResponse:
        if not request.worker or not 1 <= request.lease_seconds <= 3600:
            raise InvalidArgument("a claim names its worker and a lease of 1..3600 s")
        job = self.store.claim_job(request.model, request.worker, request.lease_seconds)
        return pb.ClaimJobResponse(found=job is not None, job=job_to_pb(job) if job is not None else None)

    @handles_errors
    def ReportJob(self, request, context) -> ft.FineTuningJob:
        return job_to_pb(self.store.report_job(
            request.id, request.worker, step=request.step, total_steps=request.total_steps,
            trained_tokens=request.trained_tokens, lease_seconds=max(1.0, request.lease_seconds),
            events=[event_of(e) for e in request.events], checkpoint=request.checkpoint,
            checkpoint_loss=_optional(request, "checkpoint_loss")))

    @handles_errors
    def FinishJob(self, request, context) -> ft.FineTuningJob:
        job = self.store.finish_job(request.id, request.worker, adapter=request.adapter, error=request.error,
                                    cancelled=request.cancelled,
                                    validation_accuracy=_optional(request, "validation_accuracy"),
                                    final_loss=_optional(request, "final_loss"), trained_tokens=request.trained_tokens)
        self._settle()       # a new adapter version: every gateway sees it before the replica reports success
        return job_to_pb(job)

    @handles_stream_errors
    def GetCheckpoint(self, request, context) -> Iterator[tensor_pb2.Chunk]:
        for chunk in split_chunks(self.store.checkpoint(request.id), CHUNK_BYTES):
            yield tensor_pb2.Chunk(data=chunk)
