"""Training files, jobs and events as messages (fine_tuning.proto) and back: the store's records on the wire."""
from __future__ import annotations

from hmi_client.v1 import fine_tuning_pb2 as pb
from services.knowledge_store.job_records import FileRecord, Hyperparameters, JobEvent, JobRecord

OWNER_METADATA = "x-hmi-owner"      # the gateway's caller (its key's name), on file and job calls to the store


def file_to_pb(record: FileRecord) -> pb.TrainingFile:
    return pb.TrainingFile(id=record.id, filename=record.filename, purpose=record.purpose, bytes=record.bytes,
                           created_at=record.created_at, kind=record.kind, examples=record.examples,
                           labels=record.labels, owner=record.owner)


def hyperparameters_to_pb(hyper: Hyperparameters) -> pb.Hyperparameters:
    return pb.Hyperparameters(epochs=hyper.epochs, steps=hyper.steps, learning_rate=hyper.learning_rate,
                              batch_size=hyper.batch_size, rank=hyper.rank, targets=hyper.targets,
                              learning_rate_multiplier=hyper.learning_rate_multiplier)


def hyperparameters_of(message: pb.Hyperparameters) -> Hyperparameters:
    return Hyperparameters(epochs=message.epochs, steps=message.steps, learning_rate=message.learning_rate,
                           batch_size=message.batch_size, rank=message.rank, targets=list(message.targets),
                           learning_rate_multiplier=message.learning_rate_multiplier)


def job_to_pb(job: JobRecord) -> pb.FineTuningJob:
    message = pb.FineTuningJob(
        id=job.id, tenant_id=job.tenant_id, training_file=job.training_file, validation_file=job.validation_file,
        hyperparameters=hyperparameters_to_pb(job.hyperparameters), seed=job.seed, status=job.status,
        fine_tuned_model=job.fine_tuned_model, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, error=job.error, step=job.step, total_steps=job.total_steps,
        trained_tokens=job.trained_tokens, worker=job.worker, attempts=job.attempts,
        result_version=job.result_version, kind=job.kind, model=job.model, owner=job.owner,
        cancel_requested=job.cancel_requested)
    if job.validation_accuracy is not None:
        message.validation_accuracy = job.validation_accuracy
    if job.final_loss is not None:
        message.final_loss = job.final_loss
    return message


def event_to_pb(event: JobEvent) -> pb.FineTuningEvent:
    message = pb.FineTuningEvent(sequence=event.sequence, created_at=event.created_at, level=event.level,
                                 message=event.message, type=event.type, step=event.step)
    if event.loss is not None:
        message.loss = event.loss
    if event.accuracy is not None:
        message.accuracy = event.accuracy
    return message


def event_of(message: pb.FineTuningEvent) -> JobEvent:
    return JobEvent(message.sequence, message.created_at, message.level or "info", message.message,
                    message.type or "message", message.step,
                    message.loss if message.HasField("loss") else None,
                    message.accuracy if message.HasField("accuracy") else None)


def checkpoints_to_pb(job: JobRecord) -> pb.ListCheckpointsResponse:
    reply = pb.ListCheckpointsResponse()
    for entry in job.checkpoints:
        checkpoint = reply.checkpoints.add(id=entry["id"], step=entry["step"], created_at=entry["created_at"],
                                           bytes=entry["bytes"])
        if entry.get("loss") is not None:
            checkpoint.loss = entry["loss"]
    return reply
