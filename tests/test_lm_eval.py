"""lm-evaluation-harness against the OpenAI-compatible door: its `local-completions` model scores a generative
tenant through /v1/completions (token-id prompts, echo, logprobs) and gives the same loglikelihoods and
accuracies as its own `hf` backend on the plain transformers model with the tenant's adapter merged."""
from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.integration

QUESTIONS = [
    {"question": "the service was", "choices": [" quick", " slow", " rain"], "answer": 0},
    {"question": "rain is expected", "choices": [" tomorrow", " never"], "answer": 1},
    {"question": "the film was", "choices": [" great", " a dull plot", " blue"], "answer": 2},
]

TASKS = {
    "hmi_tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                    "metric_list": [{"metric": "acc"}]},
    "hmi_tiny_ll": {"output_type": "loglikelihood", "doc_to_text": "{{question}}",
                    "doc_to_target": "{{choices[0]}}", "metric_list": [{"metric": "perplexity"}]},
}


def write_tasks(folder, data_file) -> None:
    import yaml
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def test_lm_eval_scores_a_tenant_as_its_hf_backend_scores_the_merged_model(front_door, tiny_llama_dir, tmp_path,
                                                                           monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.tasks import TaskManager

    from models.adapter_format import parse_adapter
    from models.dims import ModelDims
    from models.loading import load_causal_lm
    from models.lora_merge import merged_model
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", front_door.admin_token)
    client = front_door.client(timeout=60)
    try:
        client.build_domain("lm-eval", "", split_layer=0, context=1, min_count=1, model="gen")
        client.register_tenant("lm-eval-bard", "lm-eval", [], seed=21)
        adapter = parse_adapter(client.get_adapter("lm-eval-bard"), ModelDims.from_dir(tiny_llama_dir), num_labels=0)
    finally:
        client.close()
    merged_dir = tmp_path / "merged"
    merged_model(load_causal_lm(tiny_llama_dir), adapter).save_pretrained(merged_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, merged_dir / name)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    write_tasks(tasks_dir, data)
    manager = TaskManager(include_path=str(tasks_dir))

    def evaluate(model: str, model_args: str) -> dict:
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), task_manager=manager,
                                       log_samples=True, batch_size=1, device="cpu")

    served = evaluate("local-completions", f"model=lm-eval-bard,base_url=http://{front_door.http_addr}/v1/completions,"
                      f"tokenizer_backend=huggingface,tokenizer={tiny_llama_dir},tokenized_requests=True,"
                      f"num_concurrent=1,max_retries=1")
    reference = evaluate("hf", f"pretrained={merged_dir},dtype=float32")
    for task in TASKS:
        got = [s["resps"] for s in served["samples"][task]]
        want = [s["resps"] for s in reference["samples"][task]]
        assert len(got) == len(want) > 0
        for ours, theirs in zip(got, want):
            for (ours_ll, ours_greedy), (their_ll, their_greedy) in zip((r[0] for r in ours), (r[0] for r in theirs)):
                assert abs(float(ours_ll) - float(their_ll)) < 1e-3, task
                assert bool(ours_greedy) == bool(their_greedy), task
    scores = [float(r[0][0]) for s in served["samples"]["hmi_tiny_mc"] for r in s["resps"]]
    assert len(scores) == sum(len(q["choices"]) for q in QUESTIONS) and all(score < 0 for score in scores)
    assert len({round(score, 3) for score in scores}) > 1              # real scores, not one constant
    assert served["results"]["hmi_tiny_mc"]["acc,none"] == reference["results"]["hmi_tiny_mc"]["acc,none"]
