"""OpenAI-compatible files and fine-tuning routes, so the official client's `files.create(purpose="fine-tune")`
and `fine_tuning.jobs.*` work against HMI. The job's `model` is the tenant to train; `fine_tuned_model` (set once
the job succeeded) names the tenant that serves the result: the same one, or `<model>.ft-<suffix>` when the job
was created with a `suffix`. Hyperparameters take OpenAI's names (`n_epochs`, `batch_size`,
`learning_rate_multiplier`, each also "auto") and, as extensions, HMI's (`learning_rate`, `rank`, `steps`)."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from hmi_client.v1 import fine_tuning_pb2 as ft
from services.common.codec import split_chunks
from services.gateway.http.door import ApiError, CallerDep, Door, door_of

router = APIRouter(prefix="/v1", tags=["fine-tuning"])
UPLOAD_PATH = "/v1/files"
MAX_UPLOAD_BYTES = 64 << 20         # the store's default --max-file-mib; the store refuses what is over its own
INT32 = 2**31 - 1


def _tuning(door: Door):
    if door.fine_tuning is None:
        raise ApiError(404, "this gateway does not serve fine-tuning")
    return door.fine_tuning


def file_json(record: ft.TrainingFile) -> dict:
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": int(record.created_at),
            "filename": record.filename, "purpose": record.purpose, "status": "processed",
            "status_details": None, "hmi": {"kind": record.kind, "examples": record.examples,
                                            "labels": list(record.labels)}}


def job_json(job: ft.FineTuningJob) -> dict:
    hyper = job.hyperparameters
    error = None
    if job.status == "failed":
        error = {"code": "training_failed", "message": job.error, "param": None}
    return {
        "id": job.id, "object": "fine_tuning.job", "model": job.tenant_id, "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "organization_id": "hmi", "result_files": [], "status": job.status,
        "validation_file": job.validation_file or None, "training_file": job.training_file,
        "hyperparameters": {"n_epochs": hyper.epochs or "auto", "batch_size": hyper.batch_size or "auto",
                            "learning_rate_multiplier": hyper.learning_rate_multiplier or "auto"},
        "trained_tokens": int(job.trained_tokens) if job.status == "succeeded" else None,
        "error": error, "seed": int(job.seed), "estimated_finish": None, "integrations": [],
        "method": {"type": "supervised"},
        "hmi": {"step": job.step, "total_steps": job.total_steps, "worker": job.worker, "attempts": job.attempts,
                "result_version": int(job.result_version), "kind": job.kind, "base_model": job.model,
                "validation_accuracy": job.validation_accuracy if job.HasField("validation_accuracy") else None,
                "final_loss": job.final_loss if job.HasField("final_loss") else None,
                "target_tenant": job.fine_tuned_model},
    }


def event_json(job_id: str, event: ft.FineTuningEvent) -> dict:
    data: dict[str, Any] = {}
    if event.type == "metrics":
        data = {"step": event.step, "train_loss": event.loss if event.HasField("loss") else None}
        if event.HasField("accuracy"):
            data["valid_mean_token_accuracy"] = event.accuracy
    return {"id": f"ftevent-{job_id[6:]}-{event.sequence}", "object": "fine_tuning.job.event",
            "created_at": int(event.created_at), "level": event.level, "message": event.message, "type": event.type,
            "data": data}


@router.post("/files", summary="upload a training file (JSONL, purpose \"fine-tune\")")
async def upload_file(request: Request, caller: CallerDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> dict:
    door = door_of(request)
    tuning = _tuning(door)
    data = await file.read()
    requests = iter([ft.UploadFileRequest(spec=ft.FileSpec(filename=file.filename or "", purpose=purpose))]
                    + [ft.UploadFileRequest(data=chunk) for chunk in split_chunks(data)])
    return file_json(await door.run(caller, tuning.upload_file, requests, timeout=600.0))


@router.get("/files", summary="the training files this credential uploaded")
async def list_files(request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    reply = await door.run(caller, _tuning(door).list_files)
    return {"object": "list", "data": [file_json(f) for f in reply.files], "has_more": False}


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    return file_json(await door.run(caller, _tuning(door).get_file, file_id))


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    await door.run(caller, _tuning(door).delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


class HyperparametersBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | str | None = None
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None
    learning_rate: float | None = Field(None, gt=0, le=1, description="extension: the learning rate itself")
    rank: int | None = Field(None, ge=1, le=1024, description="extension: LoRA rank")
    steps: int | None = Field(None, ge=0, le=INT32, description="extension: a cap on optimizer steps")


class CreateJobBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id to fine-tune")
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersBody | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    suffix: str | None = Field(None, max_length=64, description="register the result as <model>.ft-<suffix>")
    method: dict | None = None


def _count(value, name: str, high: int) -> int:
    if value is None or value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ApiError(400, f"hyperparameters.{name} must be an integer in 1..{high} or \"auto\"",
                       f"hyperparameters.{name}")
    return value


def hyperparameters_of(body: HyperparametersBody | None) -> ft.Hyperparameters:
    if body is None:
        return ft.Hyperparameters()
    multiplier = body.learning_rate_multiplier
    if multiplier in (None, "auto"):
        multiplier = 0.0
    elif isinstance(multiplier, str) or not 0 < multiplier <= 100:
        raise ApiError(400, "hyperparameters.learning_rate_multiplier must be a number in (0, 100] or \"auto\"",
                       "hyperparameters.learning_rate_multiplier")
    return ft.Hyperparameters(epochs=_count(body.n_epochs, "n_epochs", 100),
                              batch_size=_count(body.batch_size, "batch_size", 1024),
                              learning_rate=body.learning_rate or 0.0, learning_rate_multiplier=multiplier,
                              rank=body.rank or 0, steps=body.steps or 0)


@router.post("/fine_tuning/jobs", summary="fine-tune a tenant on an uploaded file")
async def create_job(body: CreateJobBody, request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    if body.method and body.method.get("type", "supervised") != "supervised":
        raise ApiError(400, f"method {body.method.get('type')!r}: HMI trains supervised jobs only", "method")
    new_tenant = f"{body.model}.ft-{body.suffix}" if body.suffix else ""
    hyper = body.hyperparameters
    nested = ((body.method or {}).get("supervised") or {}).get("hyperparameters")
    if hyper is None and nested:        # the newer spelling: method.supervised.hyperparameters
        try:
            hyper = HyperparametersBody(**nested)
        except (TypeError, ValueError) as error:
            raise ApiError(400, f"method.supervised.hyperparameters: {error}",
                           "method.supervised.hyperparameters") from None
    message = ft.CreateJobRequest(tenant_id=body.model, training_file=body.training_file,
                                  validation_file=body.validation_file or "",
                                  hyperparameters=hyperparameters_of(hyper), seed=body.seed or 0,
                                  new_tenant_id=new_tenant)
    return job_json(await door.run(caller, _tuning(door).create_job, message))


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, caller: CallerDep, after: str = "", limit: int = 20) -> dict:
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be in 1..1000", "limit")
    door = door_of(request)
    reply = await door.run(caller, _tuning(door).list_jobs, ft.ListJobsRequest(after=after, limit=limit))
    return {"object": "list", "data": [job_json(j) for j in reply.jobs], "has_more": reply.has_more}


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    return job_json(await door.run(caller, _tuning(door).get_job, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, caller: CallerDep) -> dict:
    door = door_of(request)
    return job_json(await door.run(caller, _tuning(door).cancel_job, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", summary="the job's events, newest first")
async def list_events(job_id: str, request: Request, caller: CallerDep, after: str = "", limit: int = 20) -> dict:
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be in 1..1000", "limit")
    door = door_of(request)
    tuning = _tuning(door)
    events = await door.run(caller, lambda call: list(tuning.events(call, ft.ListJobEventsRequest(id=job_id))))
    newest_first = [event_json(job_id, e) for e in reversed(events)]
    if after:
        ids = [e["id"] for e in newest_first]
        newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": newest_first[:limit], "has_more": len(newest_first) > limit}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, caller: CallerDep, limit: int = 10) -> dict:
    door = door_of(request)
    reply = await door.run(caller, _tuning(door).checkpoints, job_id)
    data = [{"id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": int(c.created_at),
             "fine_tuned_model_checkpoint": c.id, "step_number": c.step, "fine_tuning_job_id": job_id,
             "metrics": {"step": c.step, "train_loss": c.loss if c.HasField("loss") else None}}
            for c in reversed(reply.checkpoints)]
    return {"object": "list", "data": data[:max(1, limit)], "has_more": len(data) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
