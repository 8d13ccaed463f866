"""Co-serving without tensors: training parts hold at most the token budget, a part waits while inference is
queued or running (and runs anyway once it waited max_wait, so a job progresses under full load); and the
training loop a co-served job runs in parts and resumes from checkpoints learns what one uninterrupted run
learns."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from hmi_errors import InvalidArgument
from services.compute.coserving import CoServingGate, split_by_tokens
from training.training_loop import LoopSettings, TrainingLoop


def test_parts_hold_at_most_the_budget_and_keep_every_item_in_order():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 130) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(16, 512)
        parts = split_by_tokens(list(range(len(lengths))), lengths.__getitem__, budget)
        assert [i for part in parts for i in part] == list(range(len(lengths)))
        for part in parts:
            assert len(part) == 1 or sum(lengths[i] for i in part) <= budget


def test_a_training_part_waits_for_inference_to_end():
    gate = CoServingGate(max_wait=5.0)
    gate.inference_begins()
    started: list[float] = []
    trainer = threading.Thread(target=lambda: started.append((gate.training_turn(), time.monotonic())))
    trainer.start()
    time.sleep(0.1)
    assert not started, "no part starts while an inference batch is queued or executing"
    ended = time.monotonic()
    gate.inference_ends()
    trainer.join(timeout=2)
    assert started and started[0][0] is True and started[0][1] - ended < 0.05


def test_training_still_progresses_under_full_load_and_counts_it():
    gate = CoServingGate(max_wait=0.05)
    gate.inference_begins()                      # inference that never ends
    began = time.monotonic()
    assert gate.training_turn() is False
    assert 0.04 <= time.monotonic() - began < 1.0
    assert (gate.training_parts, gate.forced_parts) == (1, 1)


def test_other_inference_work_counts_too_and_a_stop_ends_the_wait():
    busy = [True]
    gate = CoServingGate(max_wait=5.0, busy=lambda: busy[0])    # a generation engine with sequences running
    stop = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(gate.training_turn(stop)))
    waiter.start()
    time.sleep(0.05)
    assert not result
    stop.set()
    waiter.join(timeout=2)
    assert result == [False]
    busy[0] = False
    assert gate.training_turn() is True


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)


def items(count: int = 37):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, generator=generator), int(torch.randint(0, 3, (1,), generator=generator)))
            for _ in range(count)]


def loss_of(model):
    return lambda batch: torch.nn.functional.cross_entropy(model.layer(torch.stack([x for x, _ in batch])),
                                                           torch.tensor([y for _, y in batch]))


SETTINGS = LoopSettings(epochs=3, batch_size=8, learning_rate=1e-2, seed=4)


def trained(split=lambda b: [b], stop_at: int = 0, resume_from: bytes = b""):
    model = Tiny()
    loop = TrainingLoop(list(model.parameters()), items(), SETTINGS)
    if resume_from:
        loop.restore(resume_from)
    while not loop.done and not (stop_at and loop.step >= stop_at):
        loop.run_step(loss_of(model), split=split)
    return model, loop


def test_parts_and_resumes_learn_what_one_run_learns():
    whole, loop = trained()
    assert loop.step == loop.total == 15
    in_parts, _ = trained(split=lambda b: [b[:3], b[3:5], b[5:]])
    assert torch.allclose(in_parts.layer.weight, whole.layer.weight, atol=1e-6)
    _, halfway = trained(stop_at=7)
    resumed, finished = trained(resume_from=halfway.checkpoint())
    assert finished.step == 15
    assert torch.allclose(resumed.layer.weight, whole.layer.weight, atol=1e-6)
    assert torch.allclose(resumed.layer.bias, whole.layer.bias, atol=1e-6)


def test_a_checkpoint_of_another_job_is_refused():
    other = TrainingLoop(list(torch.nn.Linear(2, 2).parameters()) + [torch.nn.Parameter(torch.zeros(1))], items(),
                         SETTINGS)
    _, loop = trained(stop_at=2)
    with pytest.raises(InvalidArgument):
        other.restore(loop.checkpoint())
    with pytest.raises(InvalidArgument, match="not a safetensors"):
        loop.restore(b"junk")


def test_a_completion_loss_learns_only_the_tokens_after_the_prompt(tiny_llama_dir):
    import numpy as np

    from models.decoder import DecoderModel
    from training.causal_trainer import CausalTrainer, CausalTrainSettings, TextExample
    trainer = CausalTrainer(DecoderModel(tiny_llama_dir, torch.device("cpu")), CausalTrainSettings(split_layer=0))
    ids = np.arange(3, 13, dtype=np.int32)
    every = trainer.token_losses([TextExample(ids, None)])
    assert torch.allclose(trainer.completion_loss([TextExample(ids, None, learn_from=7)]), every[6:].mean())
    assert torch.allclose(trainer.completion_loss([TextExample(ids, None)]), every.mean())
