"""Fine-tuning as a service, end to end with real processes (a store, two compute replicas, a gateway, and a
second gateway for the last check): a job through gRPC whose adapter matches an offline `hmi tenant train` run
with the same data and seed; a job through the official `openai` client; cancellation; refusals (a bad file,
a key outside its scope); and kill -9 of the replica running a job, which then resumes elsewhere and
finishes once."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from hmi.client import HMIClient
from hmi.launcher import Service, free_port
from hmi_client.errors import InvalidArgument, PermissionDenied
from models.adapter_format import parse_adapter
from models.dims import ModelDims
from tests.conftest import start_services

LABELS = ["neg", "pos"]
GOOD_WORDS = ["great", "quick", "lovely", "helpful", "excellent"]
BAD_WORDS = ["terrible", "slow", "broken", "rude", "awful"]
ENV = {"HMI_JOB_LEASE_SECONDS": "3", "HMI_CHECKPOINT_SECONDS": "0.5", "HMI_TRAIN_PART_TOKENS": "64"}


def examples(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        words = GOOD_WORDS if i % 2 else BAD_WORDS
        rows.append({"text": f"the service was {words[i % 5]} and {words[(i // 5) % 5]} today",
                     "label": LABELS[i % 2]})
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    running = start_services(tmp_path_factory.mktemp("fine-tuning"), tiny_model_dir, computes=2, **ENV)
    with running.client(timeout=60) as client:
        corpus = "\n".join(r["text"] for r in examples(40) + examples(40, 1000))
        client.build_domain("reviews", corpus, split_layer=2, context=2, min_count=1, learn_threshold=-1,
                            bridge=False)
        for tenant in ("acme", "globex", "initech", "umbrella"):
            client.register_tenant(tenant, "reviews", LABELS, seed=5)
    yield running
    running.stop()


def second_gateway(suite) -> Service:
    """Another gateway on the same store and computes, as a deployment scales them out."""
    first = next(s for s in suite.plan() if s.name == "gateway")
    address, args = f"127.0.0.1:{free_port()}", list(first.args)
    args[args.index("--listen") + 1] = address
    args[args.index("--http") + 1] = "off"
    if "--metrics-port" in args:
        args[args.index("--metrics-port") + 1] = str(free_port())
    service = Service("gateway-2", address, args)
    suite.spawn(service)
    suite._wait_serving(service, 120)
    return service


def test_a_job_trains_what_offline_training_trains_and_serves_it_at_once(suite, tmp_path, tiny_model_dir):
    from training.tenant_training import train_tenant
    data = jsonl(examples(40))
    with suite.client(timeout=60) as client:
        before = client.get_tenant("acme").adapter_version
        uploaded = client.upload_file(data, "train.jsonl")
        assert (uploaded.kind, uploaded.examples, list(uploaded.labels)) == ("classifier", 40, LABELS)
        job = client.create_fine_tuning_job("acme", uploaded.id, epochs=3, seed=11)
        assert job.status == "queued"
        done = client.wait_for_fine_tuning_job(job.id, timeout=180)
        assert done.status == "succeeded", done.error
        assert done.result_version > before and client.get_tenant("acme").adapter_version == done.result_version
        assert done.total_steps == 6 and done.trained_tokens > 0
        events = list(client.fine_tuning_events(job.id))
        assert any(e.type == "metrics" and e.HasField("loss") for e in events)
        assert events[-1].message.startswith("job succeeded")
        served = parse_adapter(client.get_adapter("acme"), ModelDims.from_dir(tiny_model_dir), num_labels=2)

        (tmp_path / "train.jsonl").write_bytes(data)
        offline = train_tenant(client, tiny_model_dir, "reviews", tmp_path / "train.jsonl", None, LABELS, epochs=3,
                               seed=11)
    reference = parse_adapter(offline.adapter, ModelDims.from_dir(tiny_model_dir), num_labels=2)
    assert served.lora.keys() == reference.lora.keys()
    for key, (a, b) in reference.lora.items():
        # trained in parts of <= 64 tokens between inference batches, yet the same steps as one offline run
        assert torch.allclose(served.lora[key][0], a, atol=1e-4) and torch.allclose(served.lora[key][1], b, atol=1e-4)
    assert torch.allclose(served.head_weight, reference.head_weight, atol=1e-4)


def test_the_openai_client_uploads_tunes_and_follows_a_job(suite):
    openai = pytest.importorskip("openai", reason="the official openai package is not installed")
    client = openai.OpenAI(base_url=f"http://{suite.http_addr}/v1", api_key=suite.admin_token, max_retries=0)
    uploaded = client.files.create(file=("reviews.jsonl", jsonl(examples(24))), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="globex", seed=3, suffix="v1",
                                         hyperparameters={"n_epochs": 2})
    assert job.status in ("queued", "running") and job.model == "globex"
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == "globex.ft-v1"
    assert job.trained_tokens and job.finished_at
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("job succeeded"), "newest first, as OpenAI lists them"
    assert any(e.type == "metrics" for e in events)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]
    with suite.client() as hmi:
        assert hmi.classify("globex.ft-v1", ["the service was great"])[0].label in LABELS
        assert hmi.get_tenant("globex.ft-v1").spec.domain == "reviews"
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("bad.jsonl", b'{"text": "ok", "label": "pos"}\n{"text": 5}'), purpose="fine-tune")


def test_a_cancelled_job_leaves_the_tenant_as_it_was(suite):
    with suite.client(timeout=60) as client:
        before = client.get_tenant("initech").adapter_version
        uploaded = client.upload_file(jsonl(examples(200)), "long.jsonl")
        job = client.create_fine_tuning_job("initech", uploaded.id, epochs=100, batch_size=8)
        deadline = time.monotonic() + 120
        while client.get_fine_tuning_job(job.id).step < 2:
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.2)
        assert client.cancel_fine_tuning_job(job.id).cancel_requested
        done = client.wait_for_fine_tuning_job(job.id, timeout=60)
        assert done.status == "cancelled" and done.result_version == 0
        assert client.get_tenant("initech").adapter_version == before


def test_bad_files_and_keys_outside_their_scope_are_refused(suite):
    with suite.client() as admin:
        with pytest.raises(InvalidArgument, match="line 3"):
            admin.upload_file(b'{"text": "a", "label": "pos"}\n\n{"label": "neg"}')
        wrong = admin.upload_file(jsonl([{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}]))
        with pytest.raises(InvalidArgument, match="line 2 has the label 'maybe'"):
            admin.create_fine_tuning_job("acme", wrong.id)
        key = admin.create_key(["umbrella"], tenant_admin=True).secret
        reader = admin.create_key(["umbrella"]).secret
    with suite.client(token=key) as scoped:
        mine = scoped.upload_file(jsonl(examples(8)))
        with pytest.raises(PermissionDenied, match="outside this credential's scope"):
            scoped.create_fine_tuning_job("acme", mine.id)
        with pytest.raises(Exception, match="does not exist"):
            scoped.create_fine_tuning_job("umbrella", wrong.id)     # another key's file is invisible to it
        assert [f.id for f in scoped.list_files()] == [mine.id]
    with suite.client(token=reader) as inference_only:
        with pytest.raises(PermissionDenied):
            inference_only.upload_file(jsonl(examples(8)))


def test_the_cli_creates_and_follows_a_job(suite, tmp_path, capsys):
    from hmi.cli import main
    path = tmp_path / "cli.jsonl"
    path.write_bytes(jsonl(examples(16)))
    connection = [f"--gateway={suite.gateway_addr}", f"--token={suite.admin_token}"]
    assert main(["tune", "create", "acme", "--file", str(path), "--epochs", "1", "--new-tenant", "acme-cli"]
                + connection) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "-> acme-cli v" in out
    job_id = out.split()[0]
    assert main(["tune", "list", "--tenant", "acme"] + connection) == 0
    assert job_id in capsys.readouterr().out
    assert main(["tune", "cancel", job_id] + connection) == 1      # already succeeded: refused, said why
    assert "already succeeded" in capsys.readouterr().err


def test_a_job_whose_replica_is_killed_resumes_elsewhere_and_finishes_once(suite):
    with suite.client(timeout=60) as client:
        uploaded = client.upload_file(jsonl(examples(200)), "resume.jsonl")
        # Long enough that a fast machine cannot finish it before its first checkpoint (reports carry them)
        job = client.create_fine_tuning_job("umbrella", uploaded.id, epochs=100, batch_size=8, steps=2000)
        deadline = time.monotonic() + 120
        while not client.fine_tuning_checkpoints(job.id):
            assert time.monotonic() < deadline, "no checkpoint was written"
            status = client.get_fine_tuning_job(job.id).status
            assert status in ("validating_files", "queued", "running"), \
                f"the job ended ({status}) before its first checkpoint: the test needs a longer job"
            time.sleep(0.2)
        running = client.get_fine_tuning_job(job.id)
        victim = next(s for s in suite.services if s.name.startswith("compute") and s.address in running.worker)
        suite.stop([victim.name], sig=signal.SIGKILL)
        done = client.wait_for_fine_tuning_job(job.id, timeout=240)
        assert done.status == "succeeded", done.error
        assert done.attempts == 2 and victim.address not in done.worker
        messages = [e.message for e in client.fine_tuning_events(job.id)]
        assert any("resumed on" in m and "from the checkpoint at step" in m for m in messages), messages
        assert sum(m.startswith("job succeeded") for m in messages) == 1
        version = client.get_tenant("umbrella").adapter_version
        assert version == done.result_version
    second = second_gateway(suite)
    try:
        with HMIClient(second.address, timeout=60, token=suite.admin_token) as other:
            assert other.get_tenant("umbrella").adapter_version == version
            assert other.classify("umbrella", ["the service was awful"])[0].label in LABELS
    finally:
        suite.stop(["gateway-2"])


def test_a_generative_tenant_is_tuned_on_chat_lines_and_generates_with_the_result(front_door):
    chat = [{"messages": [{"role": "user", "content": f"say hello {i}"},
                          {"role": "assistant", "content": f"hello number {i}"}]} for i in range(12)]
    with front_door.client(timeout=60) as client:
        client.build_domain("ft-stories", "", split_layer=0, context=1, min_count=1, model="gen")
        client.register_tenant("ft-writer", "ft-stories", [], seed=4)
        before = client.get_adapter("ft-writer")
        uploaded = client.upload_file(jsonl(chat), "chat.jsonl")
        assert uploaded.kind == "generator"
        with pytest.raises(InvalidArgument, match="holds classifier examples but tenant .ft-writer. is a generator"):
            client.create_fine_tuning_job("ft-writer", client.upload_file(jsonl(examples(4))).id)
        job = client.create_fine_tuning_job("ft-writer", uploaded.id, epochs=2, batch_size=4, seed=2)
        done = client.wait_for_fine_tuning_job(job.id, timeout=180)
        assert done.status == "succeeded", done.error
        assert client.get_adapter("ft-writer") != before
        assert client.get_tenant("ft-writer").adapter_version == done.result_version
        text = client.generate("ft-writer", "user: say hello 3\nassistant: ", max_new_tokens=4).collect()
        assert len(text.token_ids) == 4 or text.finish_reason == "stop"
