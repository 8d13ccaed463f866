"""`hmi tune create | list | show | watch | cancel | files`: fine-tuning jobs run by the deployment's compute
replicas (between their inference batches), through the gateway's FineTuning service."""
from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from hmi.commands import client_parser, connect, print_message
from hmi_client.fine_tuning import TERMINAL


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _summary(job) -> str:
    progress = f"step {job.step}/{job.total_steps}" if job.total_steps else "not started"
    result = f" -> {job.fine_tuned_model} v{job.result_version}" if job.status == "succeeded" else ""
    accuracy = f", validation accuracy {job.validation_accuracy:.4f}" if job.HasField("validation_accuracy") else ""
    error = f": {job.error}" if job.error else ""
    return f"{job.id}  {job.tenant_id}  {job.status}  {progress}{result}{accuracy}{error}"


def cmd_tune_create(args) -> int:
    with connect(args) as client:
        training = client.upload_file(Path(args.file).read_bytes(), Path(args.file).name)
        print(f"uploaded {args.file}: {training.id} ({training.examples} {training.kind} examples)", file=sys.stderr)
        validation = ""
        if args.validation:
            validation = client.upload_file(Path(args.validation).read_bytes(), Path(args.validation).name).id
        job = client.create_fine_tuning_job(args.tenant_id, training.id, validation_file=validation,
                                            epochs=args.epochs, steps=args.steps, learning_rate=args.learning_rate,
                                            batch_size=args.batch_size, rank=args.rank, seed=args.seed,
                                            targets=[t for t in args.targets.split(",") if t],
                                            new_tenant_id=args.new_tenant or "")
        print(_summary(job))
        if args.detach:
            return 0
        return _watch(client, job.id)


def _watch(client, job_id: str) -> int:
    from tqdm import tqdm
    bar = tqdm(desc=job_id, unit="step", file=sys.stderr)
    seen = 0
    try:
        while True:
            job = client.get_fine_tuning_job(job_id)
            for event in client.fine_tuning_events(job_id, after=seen):
                seen = event.sequence
                if event.type != "metrics":
                    bar.write(f"{_when(event.created_at)}  {event.level}: {event.message}", file=sys.stderr)
            bar.total, bar.n = job.total_steps or None, job.step
            bar.set_postfix(status=job.status, refresh=False)
            bar.refresh()
            if job.status in TERMINAL:
                break
            time.sleep(1.0)
    finally:
        bar.close()
    print(_summary(job))
    return 0 if job.status == "succeeded" else 1


def cmd_tune_watch(args) -> int:
    with connect(args) as client:
        return _watch(client, args.job_id)


def cmd_tune_list(args) -> int:
    with connect(args) as client:
        for job in client.list_fine_tuning_jobs(args.tenant or "", limit=args.limit):
            print(_summary(job))
    return 0


def cmd_tune_show(args) -> int:
    with connect(args) as client:
        print_message(client.get_fine_tuning_job(args.job_id))
        if args.events:
            for event in client.fine_tuning_events(args.job_id):
                print(f"{_when(event.created_at)}  {event.level}: {event.message}")
    return 0


def cmd_tune_cancel(args) -> int:
    with connect(args) as client:
        print(_summary(client.cancel_fine_tuning_job(args.job_id)))
    return 0


def cmd_tune_files(args) -> int:
    with connect(args) as client:
        for file_id in args.delete or ():
            record = client.delete_file(file_id)
            print(f"deleted {record.id}  {record.filename}  {record.bytes} bytes")
        if args.delete:
            return 0
        for record in client.list_files():
            print(f"{record.id}  {record.filename}  {record.kind}  {record.examples} examples  {record.bytes} bytes  "
                  f"{_when(record.created_at)}")
    return 0


def add_parsers(sub) -> None:
    tune = sub.add_parser("tune", help="fine-tuning jobs run by the deployment (co-served with inference)")
    group = tune.add_subparsers(dest="action", required=True)
    p = client_parser(group, "create", help="upload a training file and fine-tune a tenant on it; the result "
                                            "becomes the tenant's new adapter version, served at once")
    p.add_argument("tenant_id")
    p.add_argument("--file", required=True, help="JSONL: {\"text\", \"label\"} lines (classifiers), or "
                                                 "{\"prompt\", \"completion\"} / {\"messages\": [...]} (generators)")
    p.add_argument("--validation", help="held-out JSONL in the same format (classifiers: accuracy at the end)")
    p.add_argument("--epochs", type=int, default=0, help="0: the default (3 for classifiers, 1 for generators)")
    p.add_argument("--steps", type=int, default=0, help="a cap on optimizer steps (0: epochs decide)")
    p.add_argument("--learning-rate", type=float, default=0.0, help="0: the default (2e-3 / 1e-3)")
    p.add_argument("--batch-size", type=int, default=0, help="0: the default (32 / 8)")
    p.add_argument("--rank", type=int, default=0, help="LoRA rank (0: 8)")
    p.add_argument("--targets", default="", help="LoRA targets, comma-separated (default: the split's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tenant", help="register the result under this new tenant id (the tenant keeps its model)")
    p.add_argument("--detach", action="store_true", help="print the job and return; `hmi tune watch JOB` follows it")
    p.set_defaults(func=cmd_tune_create)
    p = client_parser(group, "watch", help="follow a job with a progress bar until it ends")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_tune_watch)
    p = client_parser(group, "list", help="jobs, newest first")
    p.add_argument("--tenant", help="only this tenant's")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_tune_list)
    p = client_parser(group, "show", help="a job's record (JSON), with --events its events")
    p.add_argument("job_id")
    p.add_argument("--events", action="store_true")
    p.set_defaults(func=cmd_tune_show)
    p = client_parser(group, "cancel", help="cancel a job; the tenant keeps the model it has")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_tune_cancel)
    p = client_parser(group, "files", help="the training files this credential uploaded")
    p.add_argument("--delete", nargs="+", metavar="FILE_ID", help="delete these files instead (each key may keep "
                                                                  "100 files of 1 GiB in all by default)")
    p.set_defaults(func=cmd_tune_files)
