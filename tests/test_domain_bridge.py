"""Domain bridges: distillation, held-out rows, the stored format, and serving through the real services."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from models.adapter_format import parse_adapter, random_adapter, serialize_adapter
from models.bridge import BridgeShape, DomainBridge, parse_bridge, serialize_bridge
from models.dims import ModelDims
from services.common.codec import decode_tensor, encode_tensor
from services.common.errors import InvalidArgument
from services.common.rpc import channel
from services.knowledge_store.bridge_distillation import DistillSettings, RateSchedule, distill
from services.knowledge_store.client import StoreClient
from services.knowledge_store.plot_builder import BuildSettings, PlotBuilder, maximal_sequences
from tests.reference import reference_bridge, reference_logits_from_layer

CORPUS = [f"the {a} {b} sat on the {c} mat" for a in ("black", "grey", "small", "old", "young")
          for b in ("cat", "dog", "bird") for c in ("red", "blue")]


@pytest.fixture(scope="module")
def builder(tiny_model, tokenizer):
    return PlotBuilder(tiny_model, tokenizer, tiny_model.config.vocab_size)


def test_untrained_bridge_is_the_identity_and_survives_a_round_trip():
    bridge = DomainBridge(BridgeShape(hidden=16, heads=2, head_dim=4, ffn=8, max_positions=32))
    rows = torch.randn(7, 16)
    torch.testing.assert_close(bridge(rows, [0, 3, 7], torch.tensor([0, 1, 2, 0, 1, 2, 3])), rows)
    bridge.init_random(torch.Generator().manual_seed(1))
    again = parse_bridge(serialize_bridge(bridge), hidden=16)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    torch.testing.assert_close(again(rows, [0, 3, 7], positions), bridge(rows, [0, 3, 7], positions))
    with pytest.raises(InvalidArgument, match="hidden size"):
        parse_bridge(serialize_bridge(bridge), hidden=32)
    with pytest.raises(InvalidArgument, match="safetensors"):
        parse_bridge(b"not a bridge at all", hidden=16)


def test_bridge_matches_the_reference_written_out_per_sequence():
    bridge = DomainBridge(BridgeShape(hidden=16, heads=2, head_dim=4, ffn=8, max_positions=32))
    bridge.init_random(torch.Generator().manual_seed(2))
    tensors = load_safetensors(serialize_bridge(bridge))
    rows = torch.randn(9, 16)
    packed = bridge(rows, [0, 4, 9], torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4]))
    torch.testing.assert_close(packed[:4], reference_bridge(tensors, 2, rows[:4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[4:], reference_bridge(tensors, 2, rows[4:]), atol=1e-5, rtol=1e-5)


def test_held_out_rows_leave_each_token_out_of_its_own_mean(builder, tokenizer):
    lines = ["the cat sat", "the cat ran", "a dog sat"]
    contents = builder.build(lines, BuildSettings(split_layer=2, context=2, min_count=2, position_offsets=False,
                                                  capture_tokens=1000))
    rows, targets = contents.held_out
    assert len(rows) == 3
    sequences = builder.tokenize(lines, 128)
    states = [builder.lower_outputs([ids], 2)[0][0].float().numpy() for ids in sequences]
    first = sequences.index(tokenizer.encode("the cat sat").ids)
    kept = next(i for i, t in enumerate(targets) if np.allclose(t.astype(np.float32), states[first], atol=2e-3))
    # "cat" after "the" occurs twice: leaving this occurrence out leaves one, under min_count 2, so the row backs
    # off to depth 1, where the one other "cat" remains: its state.
    cat = 2
    other = sequences.index(tokenizer.encode("the cat ran").ids)
    np.testing.assert_allclose(rows[kept][cat].astype(np.float32), states[other][cat], atol=3e-3)
    # [CLS] occurs in all three: its row is the mean of the two other sequences' [CLS] states
    np.testing.assert_allclose(rows[kept][0].astype(np.float32),
                               np.mean([states[i][0] for i in range(3) if i != first], axis=0), atol=3e-3)


def test_sequences_inside_longer_ones_are_not_distilled_on():
    sequences = [[101, 5, 6, 7, 102], [101, 6, 7, 102], [101, 8, 9, 102], [101, 5, 6, 7, 102], [101, 7, 102]]
    assert maximal_sequences(sequences, 10_000, strip=1) == {0, 2}
    assert maximal_sequences(sequences, 4, strip=1) == {0}, "longest first, up to the token limit"


def test_distillation_lowers_the_held_out_error(builder):
    contents = builder.build(CORPUS, BuildSettings(split_layer=2, context=2, min_count=2, capture_tokens=10_000))
    rows, targets = contents.held_out
    result = distill(rows, targets, 64, DistillSettings(steps=150, batch_size=8, heads=2, head_dim=16, ffn=64))
    assert result.steps == 150 and result.sequences == len(CORPUS)
    assert result.loss_after < 0.9 * result.loss_before, (result.loss_before, result.loss_after)
    parse_bridge(result.weights, hidden=64)


def test_automatic_distillation_stops_once_the_stopping_error_plateaus(builder):
    """Automatic steps: the bridge trains until the error on left-out sequences stops improving, cools down and
    stops well before the cap, still lowering the (separately) held-out error; the same seed, the same bridge."""
    contents = builder.build(CORPUS, BuildSettings(split_layer=2, context=2, min_count=2, capture_tokens=10_000))
    rows, targets = contents.held_out
    settings = DistillSettings(passes=1000, max_steps=3000, batch_size=8, heads=2, head_dim=16, ffn=64,
                               early_stopping=True, eval_every=10, patience=3, tolerance=0.01)
    reports = []
    result = distill(rows, targets, 64, settings, lambda *report: reports.append(report))
    assert result.stopped_early and result.planned_steps == 3000 and result.steps < 1000, result.steps
    assert result.loss_after < 0.9 * result.loss_before, (result.loss_before, result.loss_after)
    assert reports[-1][:3] == ("distilling", result.steps, result.steps), "the bar ends full at the last step"
    assert all(report[2] >= result.steps for report in reports), "totals never fall below the steps run"
    again = load_safetensors(distill(rows, targets, 64, settings).weights)   # (the metadata's order may vary)
    assert all(torch.equal(again[name], tensor) for name, tensor in load_safetensors(result.weights).items()), \
        "deterministic for a seed"
    exact = distill(rows, targets, 64, dataclasses.replace(settings, steps=40))
    assert exact.steps == 40 and not exact.stopped_early, "a set number of steps runs exactly"


def test_packed_batches_train_exactly_as_per_step_packing_did(builder):
    """A set number of steps: the same bridge, bit for bit, as the loop that packed every batch at every step."""
    contents = builder.build(CORPUS, BuildSettings(split_layer=2, context=2, min_count=2, capture_tokens=10_000))
    rows, targets = contents.held_out
    # threads=0: the distillation keeps this process's torch threads, which the loop below runs with too (another
    # thread count changes the low-order bits)
    settings = DistillSettings(steps=7, batch_size=4, heads=2, head_dim=16, ffn=64, seed=3, threads=0)
    got = load_safetensors(distill(list(rows), list(targets), 64, settings, release=True).weights)

    torch.manual_seed(settings.seed)        # the loop as it was before batches were packed once
    rng = random.Random(settings.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    train = order[max(1, len(order) // 10):]
    bridge = DomainBridge(settings.shape(64))
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 1) * (1 - step / 7))
    by_length = sorted(train, key=lambda i: (len(rows[i]), rng.random()))
    batches = [by_length[s:s + 4] for s in range(0, len(by_length), 4)]
    rng.shuffle(batches)
    for batch in batches:
        packed = torch.from_numpy(np.concatenate([rows[i] for i in batch]).astype(np.float32))
        bounds = np.concatenate([[0], np.cumsum([len(rows[i]) for i in batch])]).tolist()
        positions = torch.cat([torch.arange(len(rows[i])) for i in batch])
        target = torch.from_numpy(np.concatenate([targets[i] for i in batch]).astype(np.float32))
        loss = ((bridge(packed, bounds, positions) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert len(batches) == 7, "one pass of 27 training sequences"
    assert all(torch.equal(got[name], tensor) for name, tensor in bridge.state_dict().items())


def test_rate_schedule_decays_linearly_or_cools_down_after_a_plateau():
    plain = RateSchedule(100)
    assert [round(plain.factor(s), 6) for s in (0, 4, 50, 99)] == [0.2, 0.96, 0.5, 0.01]   # warm-up 5 steps
    cooled = RateSchedule(1000, cooldown=0.25)
    assert cooled.factor(60) == 1.0 and cooled.last == 1000
    cooled.plateau(400)
    assert cooled.last == 500 and cooled.factor(400) == 1.0 and cooled.factor(450) == 0.5 and cooled.factor(500) == 0
    late = RateSchedule(1000, cooldown=0.25)      # no plateau: the cool-down starts in time to end at the cap
    assert late.factor(799) == 1.0 and late.factor(800) == 1.0 and late.last == 1000 and late.factor(900) == 0.5


def test_distillation_runs_on_its_own_thread_count_and_restores_it(builder):
    contents = builder.build(CORPUS[:6], BuildSettings(split_layer=2, context=2, min_count=2, capture_tokens=10_000))
    before = torch.get_num_threads()
    seen = []
    distill(*contents.held_out, 64, DistillSettings(steps=3, batch_size=4, heads=2, head_dim=16, ffn=64, threads=1),
            lambda *report: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1} and torch.get_num_threads() == before


@pytest.mark.integration
def test_bridged_domain_served_through_the_gateway_equals_the_in_process_hplm(services, client, tiny_model, tokenizer,
                                                                              tiny_model_dir):
    """Build with a bridge, then: logits through the gateway = the plain upper layers fed with the bridge (written
    out independently) applied to the store's PLOT rows; and one Forward mixing a bridged and a plain domain's
    tenants gives each its own answer."""
    dims = ModelDims.from_dir(tiny_model_dir)
    domain = client.build_domain("bridged", "\n".join(CORPUS), split_layer=2, context=2, min_count=2,
                                 bridge_steps=120)
    assert domain.HasField("bridge") and domain.bridge.loss_after < domain.bridge.loss_before
    assert domain.bridge.revision == domain.revision
    plain = client.build_domain("unbridged", "\n".join(CORPUS), split_layer=2, context=2, min_count=2, bridge=False)
    assert not plain.HasField("bridge")
    adapters = {}
    for tenant, domain_name, seed in (("bridged-t", "bridged", 21), ("unbridged-t", "unbridged", 22)):
        data = serialize_adapter(random_adapter(dims, num_labels=3, rank=4, first_layer=2, seed=seed))
        client.register_tenant(tenant, domain_name, ["p", "q", "r"], data)
        adapters[tenant] = parse_adapter(data, dims, num_labels=3)
    store = StoreClient(services.store_addr, security=services.peer_security())
    tensors = load_safetensors(store.get_bridge("bridged", domain.bridge.revision))
    texts = ["the grey dog sat on the blue mat", "a small bird sat on a mat"]

    def expected(tenant: str, domain_name: str, text: str) -> torch.Tensor:
        ids = tokenizer.encode(text).ids
        reply = store.lookup(domain_name, np.asarray(ids, dtype=np.int32), np.asarray([0, len(ids)]))
        rows = torch.from_numpy(reply.vectors.astype(np.float32))
        if domain_name == "bridged":
            assert reply.bridge_revision == domain.bridge.revision
            rows = reference_bridge(tensors, domain.bridge.heads, rows)
        else:
            assert reply.bridge_revision == 0
        return reference_logits_from_layer(tiny_model, adapters[tenant], rows, 2)[0]

    for text in texts:
        for tenant, domain_name in (("bridged-t", "bridged"), ("unbridged-t", "unbridged")):
            got = client.classify(tenant, [text])[0]
            np.testing.assert_allclose(list(got.probabilities.values()),
                                       torch.softmax(expected(tenant, domain_name, text), 0).numpy(), atol=1e-4)

    order = [("bridged-t", "bridged", texts[0]), ("unbridged-t", "unbridged", texts[0]),
             ("bridged-t", "bridged", texts[1])]
    ids = [tokenizer.encode(text).ids for _, _, text in order]
    revisions = {name: client.get_domain(name).revision for name in ("bridged", "unbridged")}
    request = compute_pb2.ForwardRequest(
        token_ids=encode_tensor(np.concatenate(ids).astype(np.int32)),
        offsets=np.concatenate([[0], np.cumsum([len(x) for x in ids])]).tolist(),
        sequences=[compute_pb2.SequenceSpec(tenant_id=tenant, adapter_version=client.get_tenant(tenant).adapter_version,
                                            domain=name, split_layer=2, domain_revision=revisions[name])
                   for tenant, name, _ in order],
        want_logits=True)
    response = compute_pb2_grpc.ComputeStub(channel(services.compute_addrs[0], security=services.peer_security())).Forward(
        request, timeout=60)
    logits = decode_tensor(response.logits)
    for index, (tenant, name, text) in enumerate(order):
        got = logits[response.logit_offsets[index]:response.logit_offsets[index + 1]]
        np.testing.assert_allclose(got, expected(tenant, name, text).numpy(), atol=1e-4)
