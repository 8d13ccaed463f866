"""Training files and fine-tuning jobs in the knowledge store: validation that names the line, the job's
states, leases that hand a dead replica's job to another and refuse the old holder, and success that registers
the adapter in the same transaction (failure and cancellation leave the tenant as it was)."""
from __future__ import annotations

import json
import time

import pytest

from models.adapter_format import random_adapter, serialize_adapter
from models.dims import ModelDims
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.knowledge_store.job_records import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobEvent
from services.knowledge_store.store import KnowledgeStore, StoreSettings
from training.training_files import parse_training_file


def jsonl(*records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


GOOD = jsonl(*[{"text": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)])


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path / "data", model_dir=tiny_model_dir,
                                         model_name=tiny_model_dir.name, map_size=1 << 26, max_active_jobs=1))
    store.build_domain("d", "text one\ntext two", split_layer=2, context=1, min_count=1, no_bridge=True)
    store.put_tenant("acme", "d", ["neg", "pos"], rank=2, seed=1)
    yield store
    store.close()


def test_training_files_are_parsed_by_kind_and_bad_lines_are_named():
    assert parse_training_file(GOOD).labels == ["neg", "pos"]
    chat = parse_training_file(jsonl({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}))
    assert chat.kind == "generator" and chat.examples[0].completion == "hello"
    assert chat.examples[0].prompt.endswith("assistant: ")
    for data, needle in [(b'{"text": "a", "label": "x"}\n{"text": "b"', "line 2: not JSON"),
                         (b'{"text": "a", "label": "x"}\n\n{"text": "b"}', "line 3: expected"),
                         (b'{"text": "", "label": "x"}', "line 1: \"text\" is empty"),
                         (jsonl({"text": "a", "label": "x"}, {"prompt": "p", "completion": "c"}), "line 2: a generator"),
                         (jsonl({"messages": [{"role": "user", "content": "hi"}]}), "line 1: the last message"),
                         (b"\xff\xfe", "not UTF-8"), (b"\n\n", "no examples")]:
        with pytest.raises(InvalidArgument, match=needle):
            parse_training_file(data)


def test_an_uploaded_file_is_validated_and_kept(store):
    record = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    assert (record.kind, record.examples, record.labels) == ("classifier", 20, ["neg", "pos"])
    assert store.file_content(record.id) == GOOD and store.get_file(record.id).filename == "train.jsonl"
    with pytest.raises(InvalidArgument, match="'bad.jsonl': line 1"):
        store.put_file("bad.jsonl", "fine-tune", b"[1]", owner="admin")
    with pytest.raises(InvalidArgument, match="purpose"):
        store.put_file("x.jsonl", "assistants", GOOD, owner="admin")
    assert [f.id for f in store.list_files()] == [record.id]


def test_a_job_is_refused_for_labels_the_tenant_lacks_and_queued_otherwise(store):
    other = store.put_file("other.jsonl", "fine-tune", jsonl({"text": "a", "label": "neg"},
                                                             {"text": "b", "label": "maybe"}), owner="admin")
    with pytest.raises(InvalidArgument, match="line 2 has the label 'maybe'"):
        store.create_job("acme", other.id)
    good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    job = store.create_job("acme", good.id, seed=3)
    assert job.status == QUEUED and job.fine_tuned_model == "acme" and job.kind == "classifier"
    with pytest.raises(ResourceExhausted, match="already has 1 fine-tuning job"):
        store.create_job("acme", good.id)
    with pytest.raises(FailedPrecondition, match="used by"):
        store.delete_file(good.id)
    assert store.list_jobs("acme")[0].id == job.id
    assert "queued" in store.job_events(job.id)[0].message


def adapter_for(store, tenant="acme", seed=7) -> bytes:
    dims = ModelDims.from_dir(store.settings.model_dir)
    return serialize_adapter(random_adapter(dims, num_labels=2, rank=2, first_layer=2, seed=seed))


def test_leases_move_a_silent_job_and_refuse_its_old_holder(store):
    good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    job = store.create_job("acme", good.id)
    model = store.get_tenant("acme").model
    assert store.claim_job("another-model", "w1", 30) is None
    claimed = store.claim_job(model, "w1", lease_seconds=0.2)
    assert claimed.id == job.id and claimed.status == RUNNING and claimed.worker == "w1"
    assert store.claim_job(model, "w2", 30) is None, "a live lease is not taken over"
    store.report_job(job.id, "w1", step=3, total_steps=10, trained_tokens=99, lease_seconds=0.2,
                     events=[JobEvent(0, 0, "info", "step 3", "metrics", 3, 0.5)], checkpoint=b"ckpt-3",
                     checkpoint_loss=0.5)
    time.sleep(0.3)
    resumed = store.claim_job(model, "w2", 30)
    assert resumed.worker == "w2" and resumed.attempts == 2 and resumed.step == 3
    assert store.checkpoint(job.id) == b"ckpt-3"
    assert "resumed on w2 from the checkpoint at step 3" in store.job_events(job.id)[-1].message
    with pytest.raises(FailedPrecondition, match="no longer leased to w1"):
        store.report_job(job.id, "w1", step=4, total_steps=10, trained_tokens=1, lease_seconds=30)
    with pytest.raises(FailedPrecondition, match="no longer leased to w1"):
        store.finish_job(job.id, "w1", adapter=adapter_for(store))
    before = store.get_tenant("acme").adapter_version
    trained = adapter_for(store)
    done = store.finish_job(job.id, "w2", adapter=trained, validation_accuracy=0.75)
    assert done.status == SUCCEEDED and done.result_version > before
    assert store.get_tenant("acme").adapter_version == done.result_version
    assert store.get_adapter("acme")[1] == trained
    assert store.checkpoint(job.id) == b"", "a finished job's checkpoint is dropped"


def test_failure_and_cancellation_leave_the_tenant_untouched(store):
    good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    version = store.get_tenant("acme").adapter_version
    model = store.get_tenant("acme").model
    job = store.create_job("acme", good.id)
    store.claim_job(model, "w1", 30)
    failed = store.finish_job(job.id, "w1", adapter=b"not safetensors")
    assert failed.status == FAILED and "did not validate" in failed.error
    queued = store.create_job("acme", good.id)
    assert store.cancel_job(queued.id).status == CANCELLED
    running = store.create_job("acme", good.id, new_tenant_id="acme-v2")
    store.claim_job(model, "w1", 30)
    assert store.cancel_job(running.id).cancel_requested
    assert store.report_job(running.id, "w1", step=1, total_steps=5, trained_tokens=1, lease_seconds=30
                            ).cancel_requested
    assert store.finish_job(running.id, "w1", cancelled=True).status == CANCELLED
    assert store.get_tenant("acme").adapter_version == version
    with pytest.raises(Exception, match="not registered"):
        store.get_tenant("acme-v2")


def test_a_new_tenant_id_gets_the_result_and_the_source_keeps_its_model(store):
    good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    version = store.get_tenant("acme").adapter_version
    job = store.create_job("acme", good.id, new_tenant_id="acme-ft")
    store.claim_job(store.get_tenant("acme").model, "w1", 30)
    store.finish_job(job.id, "w1", adapter=adapter_for(store))
    assert store.get_tenant("acme-ft").labels == ["neg", "pos"]
    assert store.get_tenant("acme").adapter_version == version


def test_jobs_are_counted_by_status_for_the_metrics(store):
    good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
    store.cancel_job(store.create_job("acme", good.id).id)
    store.create_job("acme", good.id)
    counts = store.job_counts()
    assert (counts["queued"], counts["cancelled"], counts["running"]) == (1, 1, 0)


def test_a_tenants_training_tokens_per_day_are_capped(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path / "quota", model_dir=tiny_model_dir,
                                         model_name=tiny_model_dir.name, map_size=1 << 26,
                                         max_training_tokens_per_day=1000))
    try:
        store.build_domain("d", "text one\ntext two", split_layer=2, context=1, min_count=1, no_bridge=True)
        for tenant in ("acme", "other"):
            store.put_tenant(tenant, "d", ["neg", "pos"], rank=2, seed=1)
        version = store.get_tenant("acme").adapter_version
        good = store.put_file("train.jsonl", "fine-tune", GOOD, owner="admin")
        model = store.get_tenant("acme").model
        job = store.create_job("acme", good.id)
        store.claim_job(model, "w1", 30)
        under = store.report_job(job.id, "w1", step=1, total_steps=9, trained_tokens=600, lease_seconds=30)
        assert under.status == RUNNING and not under.cancel_requested
        over = store.report_job(job.id, "w1", step=2, total_steps=9, trained_tokens=1200, lease_seconds=30)
        assert over.status == FAILED and over.cancel_requested, "the replica is told to stop"
        assert "training-token quota (1200 tokens in 24 hours" in over.error
        assert "--max-training-tokens-per-day 1000" in store.job_events(job.id)[-1].message
        with pytest.raises(FailedPrecondition):
            store.finish_job(job.id, "w1", adapter=adapter_for(store))
        assert store.get_tenant("acme").adapter_version == version, "the tenant keeps its model"
        with pytest.raises(ResourceExhausted, match=r"trained on 1200 tokens in the last 24 hours.*in 24\.0 h"):
            store.create_job("acme", good.id)
        assert store.create_job("other", good.id).status == QUEUED, "the quota is per tenant"
    finally:
        store.close()


def test_each_key_keeps_a_bounded_number_and_size_of_files(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path / "files", model_dir=tiny_model_dir,
                                         model_name=tiny_model_dir.name, map_size=1 << 26, max_owner_files=2,
                                         max_owner_file_bytes=2 * len(GOOD) + 10))
    try:
        first = store.put_file("a.jsonl", "fine-tune", GOOD, owner="key-a")
        store.put_file("b.jsonl", "fine-tune", GOOD, owner="key-a")
        with pytest.raises(ResourceExhausted, match="keeps 2 training files"):
            store.put_file("c.jsonl", "fine-tune", GOOD, owner="key-a")
        store.put_file("c.jsonl", "fine-tune", GOOD, owner="key-b")          # another key has its own room
        store.delete_file(first.id)
        store.put_file("c.jsonl", "fine-tune", b"\n".join([GOOD] * 1), owner="key-a")   # room again
        store.delete_file(store.put_file("d.jsonl", "fine-tune", GOOD, owner="key-b").id)
        bigger = GOOD + b"\n" + jsonl({"text": "x" * 40, "label": "pos"})
        with pytest.raises(ResourceExhausted, match="would pass its limit"):
            store.put_file("e.jsonl", "fine-tune", bigger, owner="key-b")
        assert sorted(r.owner for r in store.list_files()) == ["key-a", "key-a", "key-b"]
    finally:
        store.close()
