"""`hmi tenant train`: a tenant trained on PLOT outputs classifies well through the served path."""
from __future__ import annotations

import json
import random
import re
import subprocess

import pytest

from hmi.launcher import hmi_command
from tests.helpers import cli_env

pytestmark = pytest.mark.integration
GOOD = ["good", "great", "wonderful", "excellent", "lovely", "superb"]
BAD = ["bad", "awful", "terrible", "dull", "boring", "poor"]
NOUNS = ["film", "meal", "service", "hotel", "book", "show", "game", "song"]


def sample(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        word = rng.choice(GOOD if label == "positive" else BAD)
        text = f"the {rng.choice(NOUNS)} was {word} and {rng.choice(['we', 'they', 'i'])} said so"
        rows.append({"text": text, "label": label})
    return rows


def test_trained_tenant_is_accurate_through_the_gateway(services, client, tmp_path, tiny_model_dir):
    rng = random.Random(0)
    train, evaluation = sample(rng, 240), sample(rng, 60)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in evaluation))
    client.build_domain("reviews", "\n".join(r["text"] for r in train), split_layer=1, context=2, min_count=2)
    env = cli_env(services)
    result = subprocess.run(hmi_command() + ["tenant", "train", "critic", "--domain", "reviews", "--train",
                                            str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                                            "--model", str(tiny_model_dir), "--epochs", "10", "--seed", "1",
                                            "--learning-rate", "0.003"],  # a random tiny model needs a larger step
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = float(re.search(r"eval accuracy ([\d.]+)", result.stdout)[1])
    assert reported >= 0.9, result.stdout

    predictions = client.classify("critic", [r["text"] for r in evaluation])
    served = sum(p.label == r["label"] for p, r in zip(predictions, evaluation)) / len(evaluation)
    assert served >= 0.9, f"served accuracy {served:.2f}"
    assert served == pytest.approx(reported, abs=0.05), "the served path must behave as the trainer measured"
    # Above a split the trainer adapts every projection of the computed layers (and only those) by default.
    from models.adapter_format import parse_adapter
    from models.dims import ModelDims
    from models.split_defaults import ENCODER_PROJECTIONS
    adapter = parse_adapter(client.get_adapter("critic"), ModelDims.from_dir(tiny_model_dir), num_labels=2)
    assert set(adapter.lora) == {(layer, target) for layer in range(1, ModelDims.from_dir(tiny_model_dir).layers)
                                 for target in ENCODER_PROJECTIONS}


def test_retrained_adapter_is_served_on_the_next_request(services, client, tmp_path, tiny_model_dir):
    """Replacing a tenant's adapter: the gateway invalidates at once, compute loads the new version."""
    from models.adapter_format import random_adapter, serialize_adapter
    from models.dims import ModelDims
    dims = ModelDims.from_dir(tiny_model_dir)
    client.build_domain("swap", "", split_layer=0, context=1, min_count=1)
    first = serialize_adapter(random_adapter(dims, num_labels=2, rank=4, first_layer=0, seed=1))
    second = serialize_adapter(random_adapter(dims, num_labels=2, rank=4, first_layer=0, seed=2))
    client.register_tenant("swapper", "swap", ["a", "b"], first)
    before = client.classify("swapper", ["hello there"])[0].probabilities
    client.register_tenant("swapper", "swap", ["a", "b"], second)
    after = client.classify("swapper", ["hello there"])[0].probabilities
    assert after != pytest.approx(before, abs=1e-4)
    client.register_tenant("swapper", "swap", ["a", "b"], first)
    assert client.classify("swapper", ["hello there"])[0].probabilities == pytest.approx(before, abs=1e-6)
