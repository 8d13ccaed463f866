"""What the store refuses and how: unservable adapters, ranks above compute's limit, empty files, bad names,
out-of-range revisions, a full LMDB map (grown first, up to its ceiling); request ids; change followers."""
from __future__ import annotations

import threading
import time

import pytest
from safetensors.torch import save as save_safetensors

from hmi.cli import build_parser
from models.adapter_format import MAX_ALPHA, parse_adapter, random_adapter, serialize_adapter
from models.dims import ModelDims
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.knowledge_store.change_followers import ChangeFollowers
from services.knowledge_store.store import KnowledgeStore, StoreSettings


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path, model_dir=tiny_model_dir, model_name="tiny",
                                         map_size=1 << 26))
    store.build_domain("d", "", split_layer=0)
    yield store
    store.close()


def adapter_with(dims: ModelDims, *, alpha: str | None = None, scale: float = 1.0, rank: int = 4) -> bytes:
    adapter = random_adapter(dims, num_labels=2, rank=rank, first_layer=0, seed=1)
    tensors = {f"layers.{layer}.{target}.lora_{which}": tensor * scale
               for (layer, target), pair in adapter.lora.items() for which, tensor in zip("AB", pair)}
    tensors["head.weight"], tensors["head.bias"] = adapter.head_weight, adapter.head_bias
    meta = {"format": "hmi-lora-v1", "rank": str(rank)} | ({"alpha": alpha} if alpha is not None else {})
    return save_safetensors(tensors, metadata=meta)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "1e38", "0", "-2"])
def test_alpha_must_be_finite_and_bounded(tiny_model_dir, alpha):
    dims = ModelDims.from_dir(tiny_model_dir)
    with pytest.raises(InvalidArgument, match=f"alpha.*{MAX_ALPHA:g}"):
        parse_adapter(adapter_with(dims, alpha=alpha), dims, num_labels=2)
    assert parse_adapter(adapter_with(dims, alpha="8"), dims, num_labels=2).alpha == 8.0


def test_huge_weights_are_refused(tiny_model_dir):
    dims = ModelDims.from_dir(tiny_model_dir)
    with pytest.raises(InvalidArgument, match="limit"):
        parse_adapter(adapter_with(dims, alpha="8", scale=1e30), dims, num_labels=2)


def test_rank_above_compute_limit_and_empty_files_are_refused(store, tiny_model_dir):
    dims = ModelDims.from_dir(tiny_model_dir)
    big = serialize_adapter(random_adapter(dims, num_labels=2, rank=64, first_layer=0, seed=1))
    with pytest.raises(InvalidArgument, match=r"rank 64 is above this deployment.s limit of 16.*--max-rank"):
        store.put_tenant("t", "d", ["a", "b"], big)
    with pytest.raises(InvalidArgument, match=r"rank 32 is outside 1\.\.16"):
        store.put_tenant("t", "d", ["a", "b"], rank=32)
    with pytest.raises(InvalidArgument, match="empty"):
        store.put_tenant("t", "d", ["a", "b"], b"", has_adapter=True)
    with pytest.raises(NotFound):
        store.get_tenant("t")
    assert store.put_tenant("t", "d", ["a", "b"], rank=16).rank == 16


@pytest.mark.parametrize("name", ["", "x" * 600, "has space", "\u00e9t\u00e9"])
def test_bad_names_in_reads_are_invalid_not_internal(store, name):
    for call in (store.get_tenant, store.get_domain, store.delete_tenant, store.delete_domain,
                 lambda n: store.get_adapter(n, 0)):
        with pytest.raises(InvalidArgument):
            call(name)


def test_revisions_beyond_the_log_are_answered(store):
    feed = store.changes_after(2**64 - 1)
    assert feed.changes == [] and not feed.complete      # a reader ahead of the store: start over
    assert store.changes_after(0).complete


def test_negative_split_layer_other_than_default_is_refused(store):
    with pytest.raises(InvalidArgument, match="-7"):
        store.build_domain("neg", "text", split_layer=-7)


def test_full_map_grows_to_its_ceiling_then_refuses_with_the_limit(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path, model_dir=tiny_model_dir, model_name="tiny",
                                         map_size=1 << 20, max_map_size=6 << 20))
    try:
        store.build_domain("d", "", split_layer=0)
        dims = ModelDims.from_dir(tiny_model_dir)
        payload = serialize_adapter(random_adapter(dims, num_labels=2, rank=16, first_layer=0, seed=1))
        written = []
        with pytest.raises(ResourceExhausted, match="--max-map-size-gib"):
            for index in range(100):
                store.put_tenant(f"t{index}", "d", ["a", "b"], payload)
                written.append(f"t{index}")
        assert store.layout.map_size == 6 << 20          # grown from 1 MiB to the ceiling
        assert len(written) * len(payload) > 2 << 20      # more than the initial map held
        assert [store.get_tenant(t).tenant_id for t in written] == written   # nothing lost, reads fine
        store.delete_tenant(written[0])                                      # deletes still work
    finally:
        store.close()


def test_request_ids_apply_a_write_once(store):
    first = store.put_tenant("t", "d", ["a", "b"], request_id="req-1")
    again = store.put_tenant("t", "d", ["a", "b"], request_id="req-1")     # a retry after a lost answer
    assert again.adapter_version == first.adapter_version
    assert store.get_tenant("t").adapter_version == first.adapter_version
    store.delete_tenant("t", request_id="req-2")
    store.delete_tenant("t", request_id="req-2")       # the retry answers OK
    with pytest.raises(NotFound):
        store.delete_tenant("t", request_id="req-3")   # a new call finds nothing to delete
    with pytest.raises(InvalidArgument, match="already used"):
        store.put_tenant("other", "d", ["a", "b"], request_id="req-1")
    built = store.build_domain("b", "", split_layer=0, request_id="req-4")
    assert store.build_domain("b", "", split_layer=0, request_id="req-4").revision == built.revision


def test_flags_accept_fractions_and_refuse_nonsense():
    parser = build_parser()
    args = parser.parse_args(["serve", "store", "--map-size-gib", "0.25", "--max-map-size-gib", "1.5"])
    assert (args.map_size_gib, args.max_map_size_gib) == (0.25, 1.5)
    for bad in ("-1", "0", "nan", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "store", "--map-size-gib", bad])


def test_writes_wait_for_live_followers_only():
    followers = ChangeFollowers(max_wait=2.0, live_seconds=0.3)
    followers.poll("gw", after=0, wait=0, latest=0)
    followers.committed(1)
    done = threading.Event()
    threading.Thread(target=lambda: (followers.wait_for(1), done.set()), daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set()                  # the follower has not read revision 1 yet
    followers.poll("gw", after=1, wait=0, latest=1)
    assert done.wait(1.0)
    followers.committed(2)                    # a follower that stopped polling is not waited for long
    started = time.monotonic()
    assert followers.wait_for(2) == [] and time.monotonic() - started < 1.0
    woken = []                                # a long poll answers as soon as a change commits
    poller = threading.Thread(target=lambda: (followers.poll("gw", after=2, wait=5, latest=2), woken.append(1)))
    poller.start()
    time.sleep(0.1)
    followers.committed(3)
    poller.join(1.0)
    assert woken == [1]


def test_backup_folder_must_be_new(store, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FailedPrecondition):
        store.backup(tmp_path / "taken")
    report = store.backup(tmp_path / "copy")
    assert (tmp_path / "copy" / "data.mdb").stat().st_size == report["bytes"] > 0


def test_large_lookups_stream_in_slices_and_are_capped(tmp_path, tiny_model_dir):
    import numpy as np
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path, model_dir=tiny_model_dir, model_name="tiny",
                                         map_size=1 << 26, max_lookup_tokens=1000))
    try:
        store.build_domain("p", "the cat sat on the mat\na dog ran far", split_layer=1, context=2, min_count=1)
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 3000, size=800).astype(np.int32)
        offsets = np.arange(0, 801, 20)
        whole = store.lookup("p", ids, offsets)[1].vectors
        slices = [result.vectors for _, result in store.lookup_slices("p", ids, offsets, slice_tokens=100)]
        assert len(slices) == 8 and all(len(s) <= 100 for s in slices)
        np.testing.assert_array_equal(np.concatenate(slices), whole)
        with pytest.raises(InvalidArgument, match="1000"):
            next(store.lookup_slices("p", np.ones(1200, np.int32), np.asarray([0, 600, 1200])))
    finally:
        store.close()
