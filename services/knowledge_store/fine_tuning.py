"""Training files and fine-tuning jobs: uploads validated once and kept by id, jobs with their state, events
and latest checkpoint, and the leases through which compute replicas run them.

A job is run by whichever compute replica of its base model claims it first; the claim is a lease the replica
renews with every report. A replica that dies stops renewing, so once the lease runs out the job is claimed
again (by any replica) and resumes from its last checkpoint; a report or result from a replica whose lease was
taken over is refused, so a job never runs twice at once. Success registers the adapter as the tenant's new
version in the same transaction that marks the job succeeded: a failed or cancelled job leaves the tenant's
model as it was.
"""
from __future__ import annotations

import logging
import secrets
import struct
import time

import lmdb

from models.adapter_format import parse_adapter
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, quoted
from services.knowledge_store import idempotency
from services.knowledge_store.job_records import (
    ACTIVE,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    FileRecord,
    Hyperparameters,
    JobEvent,
    JobRecord,
)
from services.knowledge_store.store_base import StoreBase
from services.knowledge_store.store_settings import check_name
from training.training_files import CLASSIFIER, GENERATOR, check_labels, parse_training_file

log = logging.getLogger("hmi.store.fine_tuning")
_SEQUENCE = struct.Struct(">Q")
FILE_PURPOSE = "fine-tune"
MAX_EVENTS_PER_REPLY = 1000
MAX_RECORDED_LABELS = 1000       # a file record lists this many of its labels at most
DAY = 24 * 3600.0                # the window of the training-token quota


def _event_key(job_id: str, sequence: int) -> bytes:
    return job_id.encode() + b"/" + _SEQUENCE.pack(sequence)


class FineTuningPart(StoreBase):
    # ---- files -----------------------------------------------------------------------------

    def put_file(self, filename: str, purpose: str, data: bytes, owner: str, request_id: str = "") -> FileRecord:
        """Validates and stores a training file; InvalidArgument names the line of a bad one."""
        earlier = idempotency.already_applied(self.layout, request_id, "put_file", filename or "file")
        if earlier is not None:
            return FileRecord.from_json(earlier.result)
        if purpose != FILE_PURPOSE:
            raise InvalidArgument(f"purpose {quoted(purpose)}: this deployment keeps files for fine-tuning only "
                                  f"(purpose \"{FILE_PURPOSE}\")")
        if len(data) > self.settings.max_file_bytes:
            raise InvalidArgument(f"the file has {len(data)} bytes, more than this deployment's limit of "
                                  f"{self.settings.max_file_bytes} (the store's --max-file-mib)")
        filename = (filename or "training.jsonl")[:256]
        try:
            parsed = parse_training_file(data, self.settings.max_training_examples)
        except InvalidArgument as error:
            raise InvalidArgument(f"{quoted(filename)}: {error}") from None
        record = FileRecord(id=f"file-{secrets.token_hex(12)}", filename=filename, purpose=purpose, bytes=len(data),
                            created_at=time.time(), owner=owner, kind=parsed.kind, examples=len(parsed.examples),
                            labels=parsed.labels[:MAX_RECORDED_LABELS])

        def write(txn: lmdb.Transaction) -> tuple[FileRecord, int, dict]:
            self._check_owner_room(txn, owner, len(data))
            self.layout.put_json(txn, "files", record.id, record.to_json())
            txn.put(record.id.encode(), data, db=self.layout.db["file_data"])
            return record, self.layout.revision(txn), record.to_json()

        stored = idempotency.write_once(self.layout, request_id, "put_file", filename or "file", write,
                                        lambda e: FileRecord.from_json(e.result))
        log.info("stored training file %s (%s, %d %s examples, %d bytes, owner %s)", stored.id, filename,
                 stored.examples, stored.kind, stored.bytes, owner)
        return stored

    def _check_owner_room(self, txn: lmdb.Transaction, owner: str, size: int) -> None:
        """Per key (the owner), inside the upload's own write: so two uploads at once cannot both pass."""
        settings = self.settings
        if not settings.max_owner_files and not settings.max_owner_file_bytes:
            return
        held = [FileRecord.from_json(data) for _, data in self.layout.iter_json(txn, "files")]
        held = [record for record in held if record.owner == owner]
        held_bytes = sum(record.bytes for record in held)
        if settings.max_owner_files and len(held) >= settings.max_owner_files:
            raise ResourceExhausted(f"this key keeps {len(held)} training files, its limit (the store's "
                                    f"--max-files-per-key): delete one first (hmi tune files --delete ID, DELETE "
                                    f"/v1/files/ID)")
        if settings.max_owner_file_bytes and held_bytes + size > settings.max_owner_file_bytes:
            raise ResourceExhausted(f"this key keeps {held_bytes} bytes of training files; {size} more would pass its "
                                    f"limit of {settings.max_owner_file_bytes} (the store's "
                                    f"--max-file-storage-mib-per-key): delete files first")

    def _file_in(self, txn: lmdb.Transaction, file_id: str) -> FileRecord | None:
        data = self.layout.get_json(txn, "files", file_id)
        return None if data is None else FileRecord.from_json(data)

    def get_file(self, file_id: str) -> FileRecord:
        with self.layout.read() as txn:
            record = self._file_in(txn, file_id)
        if record is None:
            raise NotFound(f"file {quoted(file_id)} does not exist (hmi tune files, GET /v1/files)")
        return record

    def file_content(self, file_id: str) -> bytes:
        with self.layout.read() as txn:
            if self._file_in(txn, file_id) is None:
                raise NotFound(f"file {quoted(file_id)} does not exist")
            return bytes(txn.get(file_id.encode(), db=self.layout.db["file_data"]))

    def list_files(self) -> list[FileRecord]:
        with self.layout.read() as txn:
            return [FileRecord.from_json(data) for _, data in self.layout.iter_json(txn, "files")]

    def delete_file(self, file_id: str) -> FileRecord:
        def write(txn: lmdb.Transaction) -> FileRecord:
            record = self._file_in(txn, file_id)
            if record is None:
                raise NotFound(f"file {quoted(file_id)} does not exist")
            for _, data in self.layout.iter_json(txn, "jobs"):
                job = JobRecord.from_json(data)
                if job.status in ACTIVE and file_id in (job.training_file, job.validation_file):
                    raise FailedPrecondition(f"file {file_id} is used by {job.id}, which is {job.status}; cancel "
                                             f"the job first")
            txn.delete(file_id.encode(), db=self.layout.db["files"])
            txn.delete(file_id.encode(), db=self.layout.db["file_data"])
            return record
        return self.layout.write(write)

    # ---- jobs ------------------------------------------------------------------------------

    def create_job(self, tenant_id: str, training_file: str, *, validation_file: str = "",
                   hyperparameters: Hyperparameters | None = None, seed: int = 0, new_tenant_id: str = "",
                   owner: str = "admin", request_id: str = "") -> JobRecord:
        """Validates the files against the tenant (labels, kind) and queues the job."""
        check_name("tenant id", tenant_id)
        if new_tenant_id:
            check_name("new tenant id", new_tenant_id)
        earlier = idempotency.already_applied(self.layout, request_id, "create_job", tenant_id)
        if earlier is not None:
            return JobRecord.from_json(earlier.result)
        hyper = hyperparameters or Hyperparameters()
        self._check_hyperparameters(hyper)
        tenant = self.get_tenant(tenant_id)
        dims = self.dims_of(self.get_domain(tenant.domain))
        kind = GENERATOR if dims.is_decoder else CLASSIFIER
        if kind == CLASSIFIER and not tenant.labels:
            raise FailedPrecondition(f"tenant {tenant_id!r} has no labels (an embedding tenant): fine-tuning trains "
                                     f"a classifier's head; register it with labels")
        examples = 0
        for role, file_id in (("training_file", training_file), ("validation_file", validation_file)):
            if not file_id and role == "validation_file":
                continue
            record = self.get_file(file_id)
            if record.kind != kind:
                raise InvalidArgument(f"{role} {file_id} holds {record.kind} examples but tenant {tenant_id!r} is a "
                                      f"{kind} ({dims.family} base model)")
            complete = len(record.labels) < MAX_RECORDED_LABELS    # else the record holds only the first ones
            if kind == CLASSIFIER and not (complete and set(record.labels) <= set(tenant.labels)):
                # parsed again only to name the line of a label the tenant lacks
                check_labels(parse_training_file(self.file_content(file_id)), tenant.labels,
                             f"{role} {file_id} ({record.filename})")
            if role == "training_file":
                examples = record.examples
        epochs = hyper.epochs or (3 if kind == CLASSIFIER else 1)
        if examples * epochs > self.settings.max_job_examples:
            raise InvalidArgument(f"{examples} examples x {epochs} epochs = {examples * epochs} training examples, "
                                  f"more than this deployment's limit per job of {self.settings.max_job_examples} "
                                  f"(the store's --max-job-examples); fewer epochs or a smaller file")
        job = JobRecord(id=f"ftjob-{secrets.token_hex(12)}", tenant_id=tenant_id, training_file=training_file,
                        validation_file=validation_file, hyperparameters=hyper, seed=seed, model=tenant.model,
                        kind=kind, owner=owner, created_at=time.time(), fine_tuned_model=new_tenant_id or tenant_id)

        def write(txn: lmdb.Transaction) -> tuple[JobRecord, int, dict]:
            active = sum(1 for _, data in self.layout.iter_json(txn, "jobs")
                         if data["tenant_id"] == tenant_id and data["status"] in ACTIVE)
            if active >= self.settings.max_active_jobs:
                raise ResourceExhausted(f"tenant {tenant_id!r} already has {active} fine-tuning job(s) queued or "
                                        f"running, this deployment's limit (the store's --max-active-jobs); wait "
                                        f"for one to finish or cancel one")
            quota = self.settings.max_training_tokens_per_day
            used, frees_at = self._tokens_trained_today(txn, tenant_id) if quota else (0, 0.0)
            if quota and used >= quota:
                wait = max(0.0, frees_at - time.time())
                raise ResourceExhausted(f"tenant {tenant_id!r} trained on {used} tokens in the last 24 hours, this "
                                        f"deployment's limit (the store's --max-training-tokens-per-day {quota}); "
                                        f"the oldest of those jobs leaves the window in {wait / 3600:.1f} h")
            self._append_event(txn, job, "info", f"job created: {examples} examples of {training_file}, "
                                                 f"{epochs} epoch(s); queued for a {job.model} compute replica")
            self._save_job(txn, job)
            return job, self.layout.revision(txn), job.to_json()

        created = idempotency.write_once(self.layout, request_id, "create_job", tenant_id, write,
                                         lambda e: JobRecord.from_json(e.result))
        log.info("fine-tuning job %s queued for tenant %s (%s)", created.id, tenant_id, created.kind)
        return created

    def _tokens_trained_today(self, txn: lmdb.Transaction, tenant_id: str,
                              current: JobRecord | None = None) -> tuple[int, float]:
        """Tokens the tenant's jobs trained on that count against its daily quota: those still running and those
        finished in the last 24 hours (`current` counted as it is now, not as stored); and when the oldest of
        the finished ones leaves that window."""
        now = time.time()
        used, leaving = (current.trained_tokens, [now + DAY]) if current is not None else (0, [])
        for _, data in self.layout.iter_json(txn, "jobs"):
            if data["tenant_id"] != tenant_id or not data.get("trained_tokens"):
                continue
            if current is not None and data["id"] == current.id:
                continue
            finished = data.get("finished_at") or 0.0
            if finished and finished < now - DAY:
                continue
            used += int(data["trained_tokens"])
            leaving.append(finished + DAY if finished else now + DAY)
        return used, min(leaving, default=now)

    def _check_hyperparameters(self, hyper: Hyperparameters) -> None:
        if not 0 <= hyper.epochs <= 100:
            raise InvalidArgument(f"epochs {hyper.epochs} is outside 1..100 (0: the default)")
        if hyper.steps < 0 or hyper.batch_size < 0 or not 0 <= hyper.batch_size <= 1024:
            raise InvalidArgument("steps and batch_size must be >= 0 (batch_size <= 1024; 0: the default)")
        if not 0 <= hyper.learning_rate <= 1 or not 0 <= hyper.learning_rate_multiplier <= 100:
            raise InvalidArgument(f"learning_rate {hyper.learning_rate} must lie in (0, 1] and "
                                  f"learning_rate_multiplier {hyper.learning_rate_multiplier} in (0, 100] (0: the "
                                  f"default)")
        if not 0 <= hyper.rank <= self.settings.max_rank:
            raise InvalidArgument(f"rank {hyper.rank} is outside 1..{self.settings.max_rank} (the deployment's "
                                  f"--max-rank; 0: the default)")

    def _job_in(self, txn: lmdb.Transaction, job_id: str) -> JobRecord | None:
        data = self.layout.get_json(txn, "jobs", job_id)
        return None if data is None else JobRecord.from_json(data)

    def _save_job(self, txn: lmdb.Transaction, job: JobRecord) -> None:
        self.layout.put_json(txn, "jobs", job.id, job.to_json())

    def _append_event(self, txn: lmdb.Transaction, job: JobRecord, level: str, message: str, *,
                      kind: str = "message", step: int = 0, loss: float | None = None,
                      accuracy: float | None = None) -> None:
        job.events += 1
        event = JobEvent(job.events, time.time(), level, message[:2000], kind, step, loss, accuracy)
        self.layout.put_json_bytes(txn, "job_events", _event_key(job.id, job.events), event.to_json())

    def get_job(self, job_id: str) -> JobRecord:
        with self.layout.read() as txn:
            job = self._job_in(txn, job_id)
        if job is None:
            raise NotFound(f"fine-tuning job {quoted(job_id)} does not exist")
        return job

    def list_jobs(self, tenant_id: str = "", limit: int = 0, after: str = "") -> list[JobRecord]:
        """Newest first (OpenAI's order); `after`: the jobs older than that one."""
        with self.layout.read() as txn:
            jobs = [JobRecord.from_json(data) for _, data in self.layout.iter_json(txn, "jobs")]
        jobs = [j for j in jobs if not tenant_id or j.tenant_id == tenant_id]
        jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        if after:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return jobs[:limit] if limit else jobs

    def job_counts(self) -> dict[str, int]:
        """Jobs per status (every status listed, 0 included), for the metrics."""
        counts = dict.fromkeys(ACTIVE + TERMINAL, 0)
        with self.layout.read() as txn:
            for _, data in self.layout.iter_json(txn, "jobs"):
                counts[data["status"]] = counts.get(data["status"], 0) + 1
        return counts

    def job_events(self, job_id: str, after: int = 0, limit: int = MAX_EVENTS_PER_REPLY) -> list[JobEvent]:
        """Events with a sequence number above `after`, oldest first."""
        self.get_job(job_id)
        events: list[JobEvent] = []
        with self.layout.read() as txn:
            cursor = txn.cursor(db=self.layout.db["job_events"])
            prefix = job_id.encode() + b"/"
            if cursor.set_range(_event_key(job_id, after + 1)):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix) or len(events) >= limit:
                        break
                    events.append(JobEvent.from_json(self.layout.decode_json(value)))
        return events

    def checkpoint(self, job_id: str) -> bytes:
        """The job's latest checkpoint (empty: none yet)."""
        self.get_job(job_id)
        with self.layout.read() as txn:
            data = txn.get(job_id.encode(), db=self.layout.db["checkpoints"])
        return bytes(data) if data is not None else b""

    def cancel_job(self, job_id: str) -> JobRecord:
        """A queued job is cancelled at once; a running one when its replica next reports (within seconds)."""
        def write(txn: lmdb.Transaction) -> JobRecord:
            job = self._job_in(txn, job_id)
            if job is None:
                raise NotFound(f"fine-tuning job {quoted(job_id)} does not exist")
            if job.status in TERMINAL:
                raise FailedPrecondition(f"job {job_id} already {job.status}; nothing to cancel")
            if job.status == RUNNING:
                job.cancel_requested = True
                self._append_event(txn, job, "info", "cancellation requested; the replica running it stops at its "
                                                     "next step")
            else:
                self._finish(txn, job, CANCELLED, "job cancelled before it started")
            self._save_job(txn, job)
            return job
        return self.layout.write(write)

    def _finish(self, txn: lmdb.Transaction, job: JobRecord, status: str, message: str, level: str = "info") -> None:
        job.status = status
        job.finished_at = time.time()
        job.worker, job.lease_until = "", 0.0
        if status == FAILED:
            job.error = message
        self._append_event(txn, job, level, message)
        txn.delete(job.id.encode(), db=self.layout.db["checkpoints"])   # the result (or nothing) is what stays

    # ---- leases (compute replicas) -------------------------------------------------------

    def claim_job(self, model: str, worker: str, lease_seconds: float) -> JobRecord | None:
        """The oldest queued job of `model` (or a running one whose lease ran out), leased to `worker`."""
        now = time.time()

        def write(txn: lmdb.Transaction) -> JobRecord | None:
            candidates = []
            for _, data in self.layout.iter_json(txn, "jobs"):
                job = JobRecord.from_json(data)
                if job.model != model:
                    continue
                if job.status == QUEUED or (job.status == RUNNING and job.lease_until < now):
                    candidates.append(job)
            if not candidates:
                return None
            job = min(candidates, key=lambda j: (j.created_at, j.id))
            if job.cancel_requested:        # its replica died before it saw the cancellation
                self._finish(txn, job, CANCELLED, "job cancelled")
                self._save_job(txn, job)
                return None
            resumed = job.status == RUNNING
            job.status, job.worker, job.lease_until = RUNNING, worker, now + lease_seconds
            job.attempts += 1
            job.started_at = job.started_at or now
            has_checkpoint = txn.get(job.id.encode(), db=self.layout.db["checkpoints"]) is not None
            message = (f"resumed on {worker} from the checkpoint at step {job.checkpoints[-1]['step']}"
                       if resumed and has_checkpoint and job.checkpoints else
                       f"restarted on {worker} (the replica running it stopped reporting)" if resumed else
                       f"started on {worker}")
            self._append_event(txn, job, "info" if not resumed else "warn", message)
            self._save_job(txn, job)
            return job

        return self.layout.write(write)

    def _leased(self, txn: lmdb.Transaction, job_id: str, worker: str) -> JobRecord:
        job = self._job_in(txn, job_id)
        if job is None:
            raise NotFound(f"fine-tuning job {quoted(job_id)} does not exist")
        if job.status != RUNNING or job.worker != worker:
            raise FailedPrecondition(f"job {job_id} is no longer leased to {worker} (it is {job.status}"
                                     f"{', on ' + job.worker if job.worker else ''}): stop training it")
        return job

    def report_job(self, job_id: str, worker: str, *, step: int, total_steps: int, trained_tokens: int,
                   lease_seconds: float, events: list[JobEvent] = (), checkpoint: bytes = b"",
                   checkpoint_loss: float | None = None) -> JobRecord:
        """Progress from the replica running the job: renews its lease; `cancel_requested` tells it to stop."""
        def write(txn: lmdb.Transaction) -> JobRecord:
            job = self._leased(txn, job_id, worker)
            job.step, job.total_steps, job.trained_tokens = step, total_steps, trained_tokens
            job.lease_until = time.time() + lease_seconds
            for event in events:
                self._append_event(txn, job, event.level, event.message, kind=event.type, step=event.step,
                                   loss=event.loss, accuracy=event.accuracy)
            quota = self.settings.max_training_tokens_per_day
            if quota:
                used, _ = self._tokens_trained_today(txn, job.tenant_id, current=job)
                if used > quota:
                    job.cancel_requested = True     # the replica stops at once; its finish is refused
                    self._finish(txn, job, FAILED, f"tenant {job.tenant_id!r} reached its training-token quota "
                                                   f"({used} tokens in 24 hours, the store's "
                                                   f"--max-training-tokens-per-day {quota}) after {trained_tokens} "
                                                   f"tokens of this job; the tenant keeps its model", level="error")
                    self._save_job(txn, job)
                    return job
            if checkpoint:
                txn.put(job.id.encode(), checkpoint, db=self.layout.db["checkpoints"])
                job.checkpoints = (job.checkpoints + [{"id": f"ftckpt-{job.id[6:]}-{step}", "step": step,
                                                       "loss": checkpoint_loss, "created_at": time.time(),
                                                       "bytes": len(checkpoint)}])[-10:]
            self._save_job(txn, job)
            return job
        return self.layout.write(write)

    def finish_job(self, job_id: str, worker: str, *, adapter: bytes = b"", error: str = "", cancelled: bool = False,
                   validation_accuracy: float | None = None, final_loss: float | None = None,
                   trained_tokens: int = 0) -> JobRecord:
        """The replica's result: the adapter registered as the tenant's new version and the job succeeded in one
        transaction; or the job failed (or cancelled) with the tenant untouched."""
        parsed = None
        if adapter and not error and not cancelled:
            job = self.get_job(job_id)
            source = self.get_tenant(job.tenant_id)
            dims = self.dims_of(self.get_domain(source.domain))
            try:
                parsed = parse_adapter(adapter, dims, num_labels=len(source.labels),
                                       min_layer=self.get_domain(source.domain).split_layer)
            except InvalidArgument as problem:
                error = f"the trained adapter did not validate: {problem}"

        def write(txn: lmdb.Transaction) -> JobRecord:
            job = self._leased(txn, job_id, worker)
            job.trained_tokens = trained_tokens or job.trained_tokens
            job.validation_accuracy, job.final_loss = validation_accuracy, final_loss
            if cancelled:
                self._finish(txn, job, CANCELLED, "job cancelled; the tenant keeps its model")
            elif error or parsed is None:
                self._finish(txn, job, FAILED, error or "the replica sent no adapter", level="error")
            else:
                source = self._tenant_in(txn, job.tenant_id)
                if source is None:
                    self._finish(txn, job, FAILED, f"tenant {job.tenant_id!r} was deleted while the job ran",
                                 level="error")
                else:
                    record, _ = self.write_tenant(txn, job.fine_tuned_model, source.domain, source.labels, parsed,
                                                  adapter, job.seed)
                    job.result_version = record.adapter_version
                    self._finish(txn, job, SUCCEEDED, f"job succeeded: tenant {job.fine_tuned_model!r} serves "
                                                      f"adapter version {record.adapter_version}"
                                                      + (f" (validation accuracy {validation_accuracy:.4f})"
                                                         if validation_accuracy is not None else ""))
            self._save_job(txn, job)
            return job

        job = self.layout.write(write)
        log.info("fine-tuning job %s %s%s", job.id, job.status, f": {job.error}" if job.error else "")
        return job
