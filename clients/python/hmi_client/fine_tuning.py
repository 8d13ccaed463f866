"""Fine-tuning calls of HMIClient: upload a training file, create, follow and cancel jobs (fine_tuning.proto).

Uploads and job creation carry a request id generated once per call, so their retries after UNAVAILABLE apply
once; following a job's events is a stream, not retried (follow again from the last sequence seen)."""
from __future__ import annotations

import time
import uuid
from typing import Callable, Iterator, TypeVar

from hmi_client.errors import translated
from hmi_client.v1 import fine_tuning_pb2 as ft
from hmi_client.v1 import fine_tuning_pb2_grpc as ft_grpc

TERMINAL = ("succeeded", "failed", "cancelled")
T = TypeVar("T")


class FineTuningCalls:
    tuning: ft_grpc.FineTuningStub
    timeout: float
    _retrying: Callable[..., T]

    def upload_file(self, data: bytes, filename: str = "training.jsonl", purpose: str = "fine-tune",
                    timeout: float | None = None) -> ft.TrainingFile:
        """Stores a JSONL training file ({"text", "label"} lines, or prompt/completion, or chat messages);
        a bad line is refused with InvalidArgument naming it."""
        from hmi_client.client import split_chunks  # client.py imports this module
        spec = ft.FileSpec(filename=filename, purpose=purpose, request_id=uuid.uuid4().hex)

        def requests() -> Iterator[ft.UploadFileRequest]:
            yield ft.UploadFileRequest(spec=spec)
            for chunk in split_chunks(data):
                yield ft.UploadFileRequest(data=chunk)

        with translated():
            return self._retrying(lambda left: self.tuning.UploadFile(requests(), timeout=left), timeout or 600)

    def list_files(self) -> list[ft.TrainingFile]:
        with translated():
            return list(self._retrying(lambda left: self.tuning.ListFiles(ft.ListFilesRequest(), timeout=left)).files)

    def delete_file(self, file_id: str) -> ft.TrainingFile:
        """Removes a training file no queued or running job uses (it frees the key's file quota)."""
        with translated():
            return self.tuning.DeleteFile(ft.GetFileRequest(id=file_id), timeout=self.timeout)

    def create_fine_tuning_job(self, tenant_id: str, training_file: str, *, validation_file: str = "",
                               epochs: int = 0, steps: int = 0, learning_rate: float = 0.0, batch_size: int = 0,
                               rank: int = 0, targets: list[str] | None = None, seed: int = 0,
                               new_tenant_id: str = "") -> ft.FineTuningJob:
        """Queues a job that trains `tenant_id` (0 / empty: `hmi tenant train`'s defaults); on success its
        adapter becomes the tenant's new version (or `new_tenant_id`'s)."""
        request = ft.CreateJobRequest(
            tenant_id=tenant_id, training_file=training_file, validation_file=validation_file, seed=seed,
            new_tenant_id=new_tenant_id, request_id=uuid.uuid4().hex,
            hyperparameters=ft.Hyperparameters(epochs=epochs, steps=steps, learning_rate=learning_rate,
                                               batch_size=batch_size, rank=rank, targets=targets or []))
        with translated():
            return self._retrying(lambda left: self.tuning.CreateJob(request, timeout=left))

    def get_fine_tuning_job(self, job_id: str) -> ft.FineTuningJob:
        with translated():
            return self._retrying(lambda left: self.tuning.GetJob(ft.GetJobRequest(id=job_id), timeout=left))

    def list_fine_tuning_jobs(self, tenant_id: str = "", limit: int = 0, after: str = "") -> list[ft.FineTuningJob]:
        request = ft.ListJobsRequest(tenant_id=tenant_id, limit=limit, after=after)
        with translated():
            return list(self._retrying(lambda left: self.tuning.ListJobs(request, timeout=left)).jobs)

    def cancel_fine_tuning_job(self, job_id: str) -> ft.FineTuningJob:
        with translated():
            return self._retrying(lambda left: self.tuning.CancelJob(ft.GetJobRequest(id=job_id), timeout=left))

    def fine_tuning_events(self, job_id: str, after: int = 0, follow: bool = False,
                           timeout: float | None = None) -> Iterator[ft.FineTuningEvent]:
        """The job's events after sequence `after`; `follow`: more as they happen, until the job ends."""
        request = ft.ListJobEventsRequest(id=job_id, after=after, follow=follow)
        with translated():
            yield from self.tuning.ListJobEvents(request, timeout=timeout or (86400 if follow else self.timeout))

    def fine_tuning_checkpoints(self, job_id: str) -> list[ft.FineTuningCheckpoint]:
        with translated():
            return list(self._retrying(lambda left: self.tuning.ListCheckpoints(ft.GetJobRequest(id=job_id),
                                                                                timeout=left)).checkpoints)

    def wait_for_fine_tuning_job(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0,
                                 progress: Callable[[ft.FineTuningJob], None] | None = None) -> ft.FineTuningJob:
        """Polls until the job succeeded, failed or was cancelled (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_fine_tuning_job(job_id)
            if progress is not None:
                progress(job)
            if job.status in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:.0f} s")
            time.sleep(poll)
