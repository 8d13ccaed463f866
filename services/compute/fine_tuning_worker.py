"""A compute replica's fine-tuning: claims jobs of its base model from the store, trains them between inference
batches (coserving.py) with the very model object it serves with, reports progress and checkpoints, and sends
the adapter back, which the store registers as the tenant's new version.

Encoder tenants train above the split on their domain's PLOT rows through its bridge, fetched once per job,
exactly what serving feeds them; decoder tenants train on prompt + completion through the upper layers. The
training loop is training/training_loop.py, the one `hmi tenant train` runs: a co-served job with the same
data and seed learns what an offline run learns."""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from hmi_client.v1 import fine_tuning_pb2 as ft
from hmi_errors import HMIError, InvalidArgument
from hmi_proto.v1 import knowledge_store_pb2 as pb
from models.adapter_format import serialize_adapter
from models.bridge import bridge_rows
from models.loading import load_tokenizer
from models.split_defaults import tenant_targets
from services.common.errors import FailedPrecondition
from services.common.rpc import peer_errors
from services.compute.bridge_cache import BridgeCache
from services.compute.coserving import CoServingGate, split_by_tokens
from services.knowledge_store.client import StoreClient, hyperparameters_of
from training.causal_trainer import CausalTrainer, CausalTrainSettings, TextExample
from training.tenant_training import encode
from training.trainer import AdapterTrainer, Example, TrainSettings
from training.training_files import CLASSIFIER, check_labels, parse_training_file
from training.training_loop import LoopSettings, TrainingLoop

log = logging.getLogger("hmi.compute.fine_tuning")
TRAINING_TOKENS = Counter("hmi_compute_training_tokens_total", "tokens of fine-tuning examples trained on "
                          "(forward and backward), co-served with inference")
TRAINING_PARTS = Counter("hmi_compute_training_parts_total", "training parts (micro-batches) run between "
                         "inference batches")
TRAINING_PART_SECONDS = Histogram("hmi_compute_training_part_seconds", "time of one training part (forward and "
                                  "backward of at most --train-part-tokens tokens): what a part started just before "
                                  "an inference batch can delay it by",
                                  buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
TRAINING_ACTIVE = Gauge("hmi_compute_training_active", "1 while this replica runs a fine-tuning job: inference "
                        "latency read beside it shows what co-serving costs")
LOOKUP_SEQUENCES = 256


@dataclass(frozen=True)
class WorkerSettings:
    part_tokens: int = 512           # tokens one training part holds at most: the bound on what it delays
    max_wait: float = 2.0            # a part starts beside inference after waiting this long
    poll_seconds: float = 2.0        # how often an idle replica asks the store for a job
    lease_seconds: float = 30.0
    report_seconds: float = 2.0      # progress (and lease renewal) this often
    checkpoint_seconds: float = 30.0
    max_tokens: int = 128            # tokens per example (as `hmi tenant train`)


class JobStopped(Exception):
    """The job was cancelled, or its lease went to another replica: stop without a result of ours."""

    def __init__(self, cancelled: bool) -> None:
        super().__init__("cancelled" if cancelled else "lease lost")
        self.cancelled = cancelled


class FineTuningWorker:
    def __init__(self, store: StoreClient, model, model_dir: Path, served_name: str, gate: CoServingGate,
                 settings: WorkerSettings = WorkerSettings(), bridges: BridgeCache | None = None,
                 listen: str = "") -> None:
        self.store = store
        self.model = model
        self.dims = model.dims
        self.model_dir = model_dir
        self.served_name = served_name
        self.gate = gate
        self.settings = settings
        self.bridges = bridges
        self.worker = f"{socket.gethostname()}/{listen or 'compute'}/{secrets.token_hex(3)}"
        self._tokenizer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fine-tuning", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim()
            except HMIError as error:        # the store is away: ask again later
                log.debug("no job claimed: %s", error)
                job = None
            if job is None:
                self._stop.wait(self.settings.poll_seconds)
                continue
            TRAINING_ACTIVE.set(1)
            try:
                self.run_job(job)
            finally:
                TRAINING_ACTIVE.set(0)

    def _claim(self) -> ft.FineTuningJob | None:
        with peer_errors():
            reply = self.store.stub.ClaimJob(pb.ClaimJobRequest(model=self.served_name, worker=self.worker,
                                                                lease_seconds=self.settings.lease_seconds),
                                             timeout=10)
        return reply.job if reply.found else None

    # ---- one job ---------------------------------------------------------------------------

    def run_job(self, job: ft.FineTuningJob) -> None:
        log.info("fine-tuning job %s for tenant %s (attempt %d) on %s", job.id, job.tenant_id, job.attempts,
                 self.worker)
        progress = _Progress(self, job)
        try:
            progress.event(f"{self.worker}: preparing {job.training_file}")
            trainer, loop, evaluation, tokens_of, loss_of = self._prepare(job, progress)
            if job.attempts > 1:
                checkpoint = self._checkpoint(job.id)
                if checkpoint:
                    loop.restore(checkpoint)
                    progress.event(f"continuing from step {loop.step} of {loop.total}")
            while not loop.done:
                batch_tokens = sum(tokens_of(e) for e in loop.batch())
                loop.run_step(loss_of, split=lambda batch: split_by_tokens(batch, tokens_of,
                                                                           self.settings.part_tokens),
                              before_part=lambda: self._turn(progress))
                progress.part_ended()
                progress.tokens += batch_tokens
                TRAINING_TOKENS.inc(batch_tokens)
                progress.step_done(loop)
            progress.event(progress.parts_summary(self.settings.part_tokens))
            accuracy = self._evaluate(trainer, evaluation)
            self._finish(job, adapter=serialize_adapter(trainer.adapter()), accuracy=accuracy, loss=loop.loss,
                         tokens=progress.tokens)
        except JobStopped as stopped:
            if stopped.cancelled:
                self._finish(job, cancelled=True, tokens=progress.tokens)
            log.info("fine-tuning job %s stopped on %s: %s", job.id, self.worker, stopped)
        except Exception as error:  # noqa: BLE001 - a job's failure is the job's, the replica serves on
            log.exception("fine-tuning job %s failed", job.id)
            message = str(error) if isinstance(error, HMIError) else f"{type(error).__name__}: {error}"
            try:
                self._finish(job, error=message[:2000], tokens=progress.tokens)
            except Exception:  # noqa: BLE001 - the store is away: the lease runs out and the job is retried
                log.warning("could not report job %s as failed; it will be retried when its lease ends", job.id)

    def _turn(self, progress: "_Progress") -> None:
        progress.part_ended()
        if self._stop.is_set():
            raise JobStopped(cancelled=False)
        progress.maybe_report()
        self.gate.training_turn(self._stop)
        TRAINING_PARTS.inc()
        progress.part_started()

    def _prepare(self, job: ft.FineTuningJob, progress: "_Progress"):
        with peer_errors():
            tenant = self.store.stub.GetTenant(pb.GetTenantRequest(tenant_id=job.tenant_id), timeout=30)
            domain = self.store.stub.GetDomain(pb.GetDomainRequest(name=tenant.spec.domain), timeout=30)
        split_layer = domain.spec.split_layer
        hyper = hyperparameters_of(job.hyperparameters)
        parsed = parse_training_file(self._file(job.training_file))
        validation = parse_training_file(self._file(job.validation_file)) if job.validation_file else None
        targets = tuple(hyper.targets) or tenant_targets(self.dims, split_layer)
        rank = hyper.rank or 8
        if parsed.kind == CLASSIFIER:
            labels = list(tenant.spec.labels)
            check_labels(parsed, labels, job.training_file)
            index = {label: i for i, label in enumerate(labels)}
            train = self._examples(tenant.spec.domain, split_layer, [(e.text, index[e.label]) for e in parsed.examples],
                                   progress)
            evaluation = []
            if validation is not None:
                check_labels(validation, labels, job.validation_file)
                evaluation = self._examples(tenant.spec.domain, split_layer,
                                            [(e.text, index[e.label]) for e in validation.examples], progress)
            trainer = AdapterTrainer(self.model, TrainSettings(
                split_layer=split_layer, num_labels=len(labels), rank=rank, alpha=2.0 * rank, targets=targets,
                epochs=hyper.epochs or 3, batch_size=hyper.batch_size or 32,
                learning_rate=hyper.rate(2e-3), seed=job.seed))
            loss_of = trainer.loss
        else:
            train = self._texts(tenant.spec.domain, split_layer, parsed.examples, progress)
            evaluation = self._texts(tenant.spec.domain, split_layer, validation.examples, progress) \
                if validation else []
            trainer = CausalTrainer(self.model, CausalTrainSettings(
                split_layer=split_layer, rank=rank, alpha=2.0 * rank, targets=targets, epochs=hyper.epochs or 1,
                batch_size=hyper.batch_size or 8, learning_rate=hyper.rate(1e-3), seed=job.seed,
                max_steps=hyper.steps))
            loss_of = trainer.completion_loss
        settings = LoopSettings(trainer.settings.epochs, trainer.settings.batch_size, trainer.settings.learning_rate,
                                0.0, job.seed, hyper.steps)
        loop = TrainingLoop(trainer.parameters(), train, settings)
        return trainer, loop, evaluation, lambda e: len(e.token_ids), loss_of

    def _file(self, file_id: str) -> bytes:
        with peer_errors():
            return b"".join(c.data for c in self.store.stub.GetFileContent(ft.GetFileRequest(id=file_id),
                                                                            timeout=120))

    def _checkpoint(self, job_id: str) -> bytes:
        with peer_errors():
            return b"".join(c.data for c in self.store.stub.GetCheckpoint(ft.GetJobRequest(id=job_id), timeout=60))

    def _rows(self, domain: str, ids: list[np.ndarray], progress: "_Progress") -> list[np.ndarray | None]:
        """The layer-L rows serving feeds these sequences: PLOT lookups through the domain's bridge."""
        rows: list[np.ndarray | None] = []
        for start in range(0, len(ids), LOOKUP_SEQUENCES):
            chunk = ids[start:start + LOOKUP_SEQUENCES]
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in chunk])]).astype(np.int64)
            with peer_errors():
                reply = self.store.lookup(domain, np.concatenate(chunk), offsets, timeout=120)
            pieces = [reply.vectors[offsets[i]:offsets[i + 1]] for i in range(len(chunk))]
            if reply.bridge_revision and self.bridges is not None:
                pieces = bridge_rows(self.bridges.get(domain, reply.bridge_revision, timeout=60), pieces)
            rows.extend(pieces)
            progress.maybe_report()
        return rows

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        return encode(self.tokenizer, texts, self.settings.max_tokens)      # as `hmi tenant train` cuts them

    def _examples(self, domain: str, split_layer: int, rows: list[tuple[str, int]], progress) -> list[Example]:
        ids = self._encode([text for text, _ in rows])
        vectors = self._rows(domain, ids, progress) if split_layer > 0 else [None] * len(ids)
        return [Example(i, v, label) for i, v, (_, label) in zip(ids, vectors, rows)]

    def _texts(self, domain: str, split_layer: int, examples, progress) -> list[TextExample]:
        """Prompt + completion; only the completion's tokens are learnt (from the prompt's token count on)."""
        limit = self.settings.max_tokens
        full = self.tokenizer.encode_batch([e.prompt + e.completion for e in examples])
        prompts = self.tokenizer.encode_batch([e.prompt for e in examples])
        ids, starts = [], []
        for encoding, prompt in zip(full, prompts):
            start = max(1, len(prompt.ids))
            if start < min(len(encoding.ids), limit):
                ids.append(np.asarray(encoding.ids[:limit], dtype=np.int32))
                starts.append(start)
        if not ids:
            raise InvalidArgument(f"no example has a completion within the first {limit} tokens to learn from")
        vectors = self._rows(domain, ids, progress) if split_layer > 0 else [None] * len(ids)
        return [TextExample(i, v, start) for i, v, start in zip(ids, vectors, starts)]

    @staticmethod
    def _evaluate(trainer, evaluation) -> float | None:
        if not evaluation:
            return None
        if isinstance(trainer, AdapterTrainer):
            return trainer.accuracy(evaluation)
        return None

    def _finish(self, job: ft.FineTuningJob, *, adapter: bytes = b"", error: str = "", cancelled: bool = False,
                accuracy: float | None = None, loss: float | None = None, tokens: int = 0) -> None:
        request = pb.FinishJobRequest(id=job.id, worker=self.worker, adapter=adapter, error=error,
                                      cancelled=cancelled, trained_tokens=tokens)
        if accuracy is not None:
            request.validation_accuracy = accuracy
        if loss is not None and loss == loss:
            request.final_loss = loss
        try:
            with peer_errors():
                finished = self.store.stub.FinishJob(request, timeout=60)
        except FailedPrecondition as lost:
            log.warning("job %s: %s", job.id, lost)
            return
        log.info("fine-tuning job %s %s on %s%s", job.id, finished.status, self.worker,
                 f": {finished.error}" if finished.error else "")


class _Progress:
    """Reports (and lease renewals) every few seconds, checkpoints less often; learns of a cancellation."""

    def __init__(self, worker: FineTuningWorker, job: ft.FineTuningJob) -> None:
        self.worker = worker
        self.job = job
        self.tokens = int(job.trained_tokens)
        self.events: list[ft.FineTuningEvent] = []
        self.loop: TrainingLoop | None = None
        now = time.monotonic()
        self.last_report = now
        self.last_checkpoint = now
        self.part_seconds: list[float] = []
        self._part_began = 0.0

    def part_started(self) -> None:
        self._part_began = time.perf_counter()

    def part_ended(self) -> None:
        if self._part_began:
            took = time.perf_counter() - self._part_began
            self.part_seconds.append(took)
            TRAINING_PART_SECONDS.observe(took)
            self._part_began = 0.0

    def parts_summary(self, part_tokens: int) -> str:
        if not self.part_seconds:
            return "no training parts ran"
        times = sorted(self.part_seconds)
        return (f"trained in {len(times)} parts of <= {part_tokens} tokens between inference batches: median "
                f"{1e3 * times[len(times) // 2]:.1f} ms, p99 {1e3 * times[int(0.99 * (len(times) - 1))]:.1f} ms, "
                f"longest {1e3 * times[-1]:.1f} ms")

    def event(self, message: str, **metrics) -> None:
        self.events.append(ft.FineTuningEvent(level="info", message=message, **metrics))

    def step_done(self, loop: TrainingLoop) -> None:
        self.loop = loop
        every = max(1, loop.total // 50)
        if loop.step % every == 0 or loop.done:
            self.events.append(ft.FineTuningEvent(level="info", type="metrics", step=loop.step, loss=loop.loss,
                                                  message=f"step {loop.step}/{loop.total}: training loss "
                                                          f"{loop.loss:.4f}"))
        self.maybe_report(force=loop.done)

    def maybe_report(self, force: bool = False) -> None:
        settings = self.worker.settings
        now = time.monotonic()
        if not force and now - self.last_report < settings.report_seconds:
            return
        request = pb.ReportJobRequest(id=self.job.id, worker=self.worker.worker, trained_tokens=self.tokens,
                                      lease_seconds=settings.lease_seconds, events=self.events)
        if self.loop is not None:
            request.step, request.total_steps = self.loop.step, self.loop.total
            if now - self.last_checkpoint >= settings.checkpoint_seconds and not self.loop.done:
                request.checkpoint = self.loop.checkpoint()
                request.checkpoint_loss = self.loop.loss
                self.last_checkpoint = now
        try:
            with peer_errors():
                reply = self.worker.store.stub.ReportJob(request, timeout=30)
        except FailedPrecondition:
            raise JobStopped(cancelled=False) from None
        except HMIError as error:       # the store is away: keep training, report again later
            log.warning("job %s: progress not reported (%s)", self.job.id, error)
            self.last_report = now
            return
        self.events = []
        self.last_report = now
        if reply.cancel_requested:
            raise JobStopped(cancelled=True)

