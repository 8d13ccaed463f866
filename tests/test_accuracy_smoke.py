"""Smoke run of the accuracy study's interface on a tiny model and data set (the study itself runs on demand)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from tests.test_training import sample

REPO = Path(__file__).resolve().parent.parent


def test_accuracy_study_writes_the_documented_json_and_a_plot(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(3)
    for name, count in (("train.jsonl", 80), ("validation.jsonl", 30)):
        (data / name).write_text("\n".join(json.dumps(row) for row in sample(rng, count)))
    out = tmp_path / "out" / "study.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--data", str(data),
                             "--no-strong-reference",
                             "--split-layers", "2", "--contexts", "1,2", "--max-train", "60", "--epochs", "2",
                             "--adapted", "yes", "--adapt-steps", "3", "--seeds", "0,1", "--bridge-steps", "5",
                             "--model", str(tiny_model_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads(out.read_text())
    assert 0.0 <= study["reference"]["accuracy"] <= 1.0
    rows = study["configurations"]
    assert sorted((r["split_layer"], r["context"], r["domain_adapted"]) for r in rows) == sorted(
        (2, context, adapted) for context in (1, 2) for adapted in (False, True))
    for row in rows:
        assert set(row) >= {"split_layer", "context", "domain_adapted", "accuracy", "plot_bytes", "method"}
        assert row["method"] == "bridge", "with no method flags the study measures what `hmi domain build` does"
        assert row["tenant_targets"] == "query,key,value,attn_out,ffn_in,ffn_out", "and what `hmi tenant train` does"
        if row["bridge"] is not None:   # kept only when it lowered the held-out error
            assert row["bridge"]["steps"] == 5 and row["layers_computed"] > 4 - row["split_layer"]
        assert row["plot_bytes"] > 0 and 0.0 <= row["accuracy"] <= 1.0 and len(row["accuracies"]) == 2
    deeper = {r["context"]: r["nodes"] for r in rows if r["split_layer"] == 2 and not r["domain_adapted"]}
    assert deeper[2] > deeper[1], "a deeper context keeps more nodes"
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "full model + LoRA" in result.stdout
    assert "reference_strong" not in study and "strong_loss_points" not in rows[0]


def test_accuracy_study_measures_every_folder_on_three_seeds_against_both_references(tmp_path, tiny_model_dir):
    folders = []
    for index, name in enumerate(("first", "second")):
        folder = tmp_path / name
        folder.mkdir()
        rng = random.Random(10 + index)
        for file, count in (("train.jsonl", 60), ("validation.jsonl", 20)):
            (folder / file).write_text("\n".join(json.dumps(row) for row in sample(rng, count)))
        folders.append(folder)
    out = tmp_path / "out" / "study.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--data",
                             ",".join(str(f) for f in folders), "--split-layers", "2", "--epochs", "1",
                             "--bridge-steps", "3", "--model", str(tiny_model_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    combined = json.loads(out.read_text())["datasets"]
    assert [Path(d["data"]).name for d in combined] == ["first", "second"]
    for folder, study in zip(folders, combined):
        assert json.loads((out.parent / f"study-{folder.name}.json").read_text()) == study
        assert study["seeds"] == [0, 1, 2], "a claim rests on three seeds unless told otherwise"
        strong = study["reference_strong"]
        assert strong["targets"] == "query,key,value,attn_out,ffn_in,ffn_out" and len(strong["accuracies"]) == 3
        assert strong["adapter_bytes"] > 2 * study["reference"]["adapter_bytes"], "every projection, not two"
        (row,) = study["configurations"]
        expected = 100 * (sum(strong["accuracies"]) - sum(row["accuracies"])) / 3
        assert abs(row["strong_loss_points"] - expected) < 1e-9
        assert row["accuracy_loss_se_points"] >= 0 and row["strong_loss_se_points"] >= 0
        assert (out.parent / f"study-{folder.name}.png").stat().st_size > 1000
    assert result.stdout.count("below the strong reference") == 2


def test_perplexity_study_writes_its_json_and_a_plot(tmp_path):
    from tests.helpers import tiny_decoder
    model_dir = tiny_decoder("llama", tmp_path / "llama")
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(4)
    for name, count in (("train.jsonl", 40), ("validation.jsonl", 10)):
        (data / name).write_text("\n".join(json.dumps(row) for row in sample(rng, count)))
    out = tmp_path / "out" / "ppl.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "perplexity.py"), "--data", str(data),
                             "--model", str(model_dir), "--split-layers", "0,2", "--train-texts", "20",
                             "--eval-texts", "10", "--steps", "8", "--learning-rate", "0.02", "--corpus-texts", "20",
                             "--methods", "plot,distill", "--distill-texts", "20", "--distill-steps", "12",
                             "--distill-learning-rate", "0.01", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["split_layer"], r["method"]) for r in rows] == [(0, "full"), (2, "plot"), (2, "distill")]
    assert rows[0]["plot_bytes"] == 0 and rows[1]["plot_bytes"] > 0
    for row in rows:
        assert row["perplexity"] < row["base_perplexity"], "training must lower held-out perplexity"
    distilled = rows[2]
    assert distilled["distill_kl_after"] < distilled["distill_kl_before"], "distillation must move toward the full model"
    assert out.with_suffix(".png").stat().st_size > 1000
