"""Fine-tuning as a service, behind every door: training files and jobs, passed on to the knowledge store with
the caller's scope. The admin sees everything; a tenant-admin key uploads files (its own only are visible to
it) and tunes the tenants it covers; an inference-only key may read its tenants' jobs.

A job's result becomes the tenant's new adapter version in the store; the gateways follow the store's change
log, so every one of them serves it without a restart."""
from __future__ import annotations

import time
from typing import Iterable, Iterator

from hmi_client.v1 import fine_tuning_pb2 as ft
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common import tracing
from services.common.errors import NotFound, PermissionDenied
from services.common.rpc import peer_errors
from services.gateway.access import REFUSED, Access, Principal
from services.gateway.core.admin import ADMIN_TIMEOUT, Relayed
from services.gateway.core.call import Call
from services.gateway.core.inference import open_access
from services.knowledge_store.client import OWNER_METADATA

TERMINAL = ("succeeded", "failed", "cancelled")
FOLLOW_POLL = 0.5            # a followed job's events are read this often
FOLLOW_LIMIT = 24 * 3600.0   # a followed stream ends after a day (the client may follow again)


class FineTuning:
    def __init__(self, store: store_grpc.KnowledgeStoreStub, access: Access | None = None) -> None:
        self.store = store
        self.access = access or open_access()

    def principal(self, call: Call) -> Principal:
        return self.access.principal_of(call.credential)

    def _options(self, call: Call, principal: Principal, timeout: float = ADMIN_TIMEOUT) -> dict:
        return {"timeout": call.timeout(timeout),
                "metadata": tracing.outgoing_metadata() + [(OWNER_METADATA, principal.name)]}

    # ---- files -----------------------------------------------------------------------------

    def upload_file(self, call: Call, requests: Iterable) -> ft.TrainingFile:
        principal = self.principal(call)
        principal.require_tenant_admin("UploadFile (a training file)")
        relayed = Relayed(requests)
        with relayed.answered():
            return self.store.UploadFile(relayed, **self._options(call, principal, 600.0))

    def _visible_file(self, record: ft.TrainingFile, principal: Principal) -> bool:
        return principal.admin or record.owner == principal.name

    def get_file(self, call: Call, file_id: str) -> ft.TrainingFile:
        principal = self.principal(call)
        with peer_errors():
            record = self.store.GetFile(ft.GetFileRequest(id=file_id), **self._options(call, principal))
        if not self._visible_file(record, principal):
            raise NotFound(f"file {file_id!r} does not exist")      # another key's file: not even its existence
        return record

    def list_files(self, call: Call) -> ft.ListFilesResponse:
        principal = self.principal(call)
        with peer_errors():
            reply = self.store.ListFiles(ft.ListFilesRequest(), **self._options(call, principal))
        return ft.ListFilesResponse(files=[f for f in reply.files if self._visible_file(f, principal)])

    def delete_file(self, call: Call, file_id: str) -> ft.TrainingFile:
        principal = self.principal(call)
        self.get_file(call, file_id)
        principal.require_tenant_admin("DeleteFile")
        with peer_errors():
            return self.store.DeleteFile(ft.GetFileRequest(id=file_id), **self._options(call, principal))

    # ---- jobs ------------------------------------------------------------------------------

    def create_job(self, call: Call, request: ft.CreateJobRequest) -> ft.FineTuningJob:
        principal = self.principal(call)
        principal.require_tenant(request.tenant_id, "CreateJob (fine-tuning)", manage=True)
        if request.new_tenant_id:
            principal.require_tenant(request.new_tenant_id, "CreateJob (the new tenant it registers)", manage=True)
        for file_id in (request.training_file, request.validation_file):
            if file_id:
                self.get_file(call, file_id)        # a key may train only on files it can see
        with peer_errors():
            return self.store.CreateJob(request, **self._options(call, principal))

    def get_job(self, call: Call, job_id: str) -> ft.FineTuningJob:
        principal = self.principal(call)
        with peer_errors():
            job = self.store.GetJob(ft.GetJobRequest(id=job_id), **self._options(call, principal))
        if not principal.covers(job.tenant_id):
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"job {job_id!r} trains tenant {job.tenant_id!r}, outside {principal.name}'s "
                                   f"scope")
        return job

    def list_jobs(self, call: Call, request: ft.ListJobsRequest) -> ft.ListJobsResponse:
        principal = self.principal(call)
        if request.tenant_id:
            principal.require_tenant(request.tenant_id, "ListJobs")
        if principal.admin or request.tenant_id:
            with peer_errors():
                return self.store.ListJobs(request, **self._options(call, principal))
        with peer_errors():
            every = self.store.ListJobs(ft.ListJobsRequest(), **self._options(call, principal)).jobs
        mine = [j for j in every if principal.covers(j.tenant_id)]
        if request.after:
            ids = [j.id for j in mine]
            mine = mine[ids.index(request.after) + 1:] if request.after in ids else []
        page = mine[:request.limit] if request.limit else mine
        return ft.ListJobsResponse(jobs=page, has_more=len(page) < len(mine))

    def cancel_job(self, call: Call, job_id: str) -> ft.FineTuningJob:
        principal = self.principal(call)
        job = self.get_job(call, job_id)
        principal.require_tenant(job.tenant_id, "CancelJob", manage=True)
        with peer_errors():
            return self.store.CancelJob(ft.GetJobRequest(id=job_id), **self._options(call, principal))

    def checkpoints(self, call: Call, job_id: str) -> ft.ListCheckpointsResponse:
        principal = self.principal(call)
        self.get_job(call, job_id)
        with peer_errors():
            return self.store.ListCheckpoints(ft.GetJobRequest(id=job_id), **self._options(call, principal))

    def events(self, call: Call, request: ft.ListJobEventsRequest) -> Iterator[ft.FineTuningEvent]:
        """The job's events after `after`; with `follow`, more as they happen, until the job ends."""
        principal = self.principal(call)
        self.get_job(call, request.id)
        after, until = request.after, time.monotonic() + FOLLOW_LIMIT
        while True:
            with peer_errors():
                events = list(self.store.ListJobEvents(ft.ListJobEventsRequest(id=request.id, after=after),
                                                       **self._options(call, principal)))
            for event in events:
                after = event.sequence
                yield event
            if not request.follow or time.monotonic() > until or call.cancellation.fired:
                return
            if not events and self.get_job(call, request.id).status in TERMINAL:
                return
            time.sleep(FOLLOW_POLL)
