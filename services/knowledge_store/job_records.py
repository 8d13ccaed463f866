"""The store's records of training files and fine-tuning jobs: typed, with explicit JSON conversion for LMDB.

Statuses and field names are OpenAI's (fine_tuning.jobs), so the HTTP door passes them on unchanged."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class FileRecord:
    id: str                          # "file-" + hex
    filename: str
    purpose: str                     # "fine-tune"
    bytes: int
    created_at: float
    owner: str                       # the key that uploaded it ("admin" for the admin token)
    kind: str                        # training_files.CLASSIFIER | GENERATOR
    examples: int
    labels: list[str] = field(default_factory=list)     # a classifier file's labels

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileRecord:
        return cls(**_known(cls, data))


@dataclass
class Hyperparameters:
    """0 / empty: the default `hmi tenant train` uses (training/tenant_training.py)."""
    epochs: int = 0
    steps: int = 0                   # a cap on optimizer steps; 0 = epochs decide
    learning_rate: float = 0.0
    batch_size: int = 0
    rank: int = 0
    targets: list[str] = field(default_factory=list)
    learning_rate_multiplier: float = 0.0    # scales the default rate when learning_rate is 0

    def rate(self, default: float) -> float:
        return self.learning_rate or default * (self.learning_rate_multiplier or 1.0)


@dataclass
class JobRecord:
    id: str                          # "ftjob-" + hex
    tenant_id: str                   # the tenant trained (OpenAI's `model`)
    training_file: str
    validation_file: str
    hyperparameters: Hyperparameters
    seed: int
    model: str                       # base model (the compute replicas of which take the job)
    kind: str                        # classifier | generator
    owner: str
    created_at: float
    fine_tuned_model: str            # the tenant that serves the result: tenant_id, or the new id asked for
    status: str = QUEUED
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    step: int = 0
    total_steps: int = 0
    trained_tokens: int = 0
    worker: str = ""                 # the compute replica holding the lease
    lease_until: float = 0.0
    attempts: int = 0                # leases taken (a resumed job has more than one)
    events: int = 0                  # events written (their sequence numbers are 1..events)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)   # {id, step, loss, created_at, bytes}
    result_version: int = 0          # the adapter version the succeeded job registered
    validation_accuracy: float | None = None
    final_loss: float | None = None
    cancel_requested: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        data = dict(data)
        hyper = Hyperparameters(**_known(Hyperparameters, data.pop("hyperparameters", {}) or {}))
        return cls(**_known(cls, data), hyperparameters=hyper)


@dataclass
class JobEvent:
    sequence: int
    created_at: float
    level: str                       # info | warn | error
    message: str
    type: str = "message"            # message | metrics
    step: int = 0
    loss: float | None = None
    accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobEvent:
        return cls(**_known(cls, data))
