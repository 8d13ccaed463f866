"""`hmi bench`: the three systems serve the same tenants identically (so the comparison is fair), and the
command writes the documented JSON and a plot (small smoke run on the tiny model)."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import Future

import numpy as np
import pytest

from hmi.bench.runner import parse_split_layers
from hmi.bench.workload import WorkloadSpec, make_requests, sweep_requests, zipf_weights
from hmi.launcher import hmi_command

pytestmark = pytest.mark.integration


def test_workload_is_zipf_and_reproducible():
    spec = WorkloadSpec(tenants=50, zipf=1.0, seed=3)
    first, again = make_requests(spec, 4000), make_requests(spec, 4000)
    assert [(r.tenant, r.text) for r in first] == [(r.tenant, r.text) for r in again]
    counts = np.bincount([r.tenant for r in first], minlength=50)
    assert counts[0] > 3 * counts[9] and counts[0] == counts.max()   # rank 1 ~10x rank 10 at alpha 1
    assert zipf_weights(4, 0.0).tolist() == [0.25] * 4
    assert sorted(r.tenant for r in sweep_requests(spec)) == list(range(50))
    arrivals = [r.at for r in make_requests(WorkloadSpec(tenants=5, mode="open", rate=100.0), 2000)]
    assert 15 < arrivals[-1] < 25   # 2,000 Poisson arrivals at 100/s take about 20 s


def test_naive_peft_and_hmi_agree_at_split_layer_zero(tiny_model_dir):
    """With L = 0 all three compute the same full model with the same adapters: same labels and same
    tenants, which is what makes their throughput comparable."""
    from hmi.bench.systems import BenchSettings, HmiSystem, NaiveSystem, PeftSystem
    settings = BenchSettings(model_dir=tiny_model_dir, split_layer=0, memory_budget_bytes=1 << 30)
    requests = make_requests(WorkloadSpec(tenants=6, seed=1), 30)
    answers = {}
    for system_class in (NaiveSystem, PeftSystem, HmiSystem):
        system = system_class(settings, 6)
        try:
            answers[system.name] = [system.classify(r.tenant, [r.text])[0] for r in requests]
        finally:
            system.close()
    assert len(set(answers["naive"])) == 2, "random heads should give both labels somewhere"
    assert answers["peft"] == answers["naive"]
    assert answers["hmi"] == answers["naive"]


def test_naive_and_peft_serve_the_same_tenants_above_a_split(tiny_model_dir):
    """Above a split the tenants adapt every projection of the computed layers; the merged model and PEFT's
    mixed batches must still compute the same thing (the logits, not only the labels)."""
    import torch

    from hmi.bench.systems import BenchSettings, NaiveSystem, PeftSystem, tenant_adapter
    from models.dims import ModelDims
    from models.split_defaults import ENCODER_PROJECTIONS
    folder = tiny_model_dir
    dims = ModelDims.from_dir(folder)
    assert {t for _, t in tenant_adapter(dims, 0, 2).lora} == set(ENCODER_PROJECTIONS)
    settings = BenchSettings(model_dir=folder, split_layer=2, memory_budget_bytes=1 << 30)
    naive, peft = NaiveSystem(settings, 3), PeftSystem(settings, 3)
    try:
        texts = ["the film was good", "a dull and long meal", "service"]
        for tenant in range(3):
            for text in texts:
                expected = naive.logits(tenant, [text])
                assert torch.allclose(peft.logits(tenant, [text]), expected, atol=1e-4), (tenant, text)
        assert not torch.allclose(naive.logits(0, texts[:1]), naive.logits(1, texts[:1]), atol=1e-3), \
            "different tenants compute different logits"
    finally:
        naive.close()
        peft.close()


def test_peft_builds_the_model_add_adapter_builds_and_mixed_batches_match_merged_models(tiny_model_dir):
    """PeftSystem adds its tenants through each LoRA layer's `update_layer` in one pass (`add_adapter` per
    tenant is quadratic): the PEFT model is the one `add_adapter` builds (same parameters, values, trainability,
    per-adapter settings), and one mixed-tenant batch through PEFT's `adapter_names` gives every tenant the
    logits of its own merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from hmi.bench.systems import RANK, BenchSettings, NaiveSystem, PeftSystem, encode, tenant_adapter
    from models.loading import load_bert
    settings = BenchSettings(model_dir=tiny_model_dir, split_layer=2, memory_budget_bytes=1 << 30)
    tenants = 5
    peft, naive = PeftSystem(settings, tenants), NaiveSystem(settings, tenants)
    try:
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(peft.modules.values()),
                            layers_to_transform=[2, 3], lora_dropout=0.0)
        reference = get_peft_model(load_bert(tiny_model_dir), config, adapter_name="t0")
        for tenant in range(tenants):
            if tenant:
                reference.add_adapter(f"t{tenant}", config)
            with torch.no_grad():
                for (layer, target), (a, b) in tenant_adapter(peft.dims, tenant, 2).lora.items():
                    module = reference.base_model.model.encoder.layer[layer].get_submodule(peft.modules[target])
                    module.lora_A[f"t{tenant}"].weight.copy_(a)
                    module.lora_B[f"t{tenant}"].weight.copy_(b)
        reference.eval()
        built, expected = peft.model.state_dict(), reference.state_dict()
        assert list(built) == list(expected) and all(torch.equal(built[k], expected[k]) for k in expected)
        assert {k: p.requires_grad for k, p in peft.model.named_parameters()} == \
            {k: p.requires_grad for k, p in reference.named_parameters()}
        assert list(peft.model.peft_config) == list(reference.peft_config) == [f"t{t}" for t in range(tenants)]
        layers = [m for m in peft.model.modules() if isinstance(m, LoraLayer)]
        reference_layers = [m for m in reference.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == len(reference_layers) == 12       # 6 projections x layers 2, 3
        for layer, other in zip(layers, reference_layers):
            for field in ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias", "active_adapters"):
                assert getattr(layer, field) == getattr(other, field), field
            assert [type(m) for m in layer.lora_dropout.values()] == [type(m) for m in other.lora_dropout.values()]
            assert "set_adapter" not in vars(layer), "the per-adapter rescans are PEFT's own again"

        texts = ["the film was good", "a dull and long meal that went on", "service", "fine", "cold soup"]
        order = [3, 0, 4, 1, 3]
        batch = [(tenant, ids, Future()) for tenant, ids in
                 zip(order, encode(peft.tokenizer, texts, settings.max_tokens))]
        with torch.inference_mode():
            peft._run(batch)                       # one forward, five rows, four adapters
        for (tenant, _, future), text in zip(batch, texts):
            assert torch.allclose(future.result(), naive.logits(tenant, [text])[0], atol=1e-4), (tenant, text)
    finally:
        peft.close()
        naive.close()


def test_bench_command_writes_the_documented_json(tmp_path, tiny_model_dir):
    """Several split layers in one command: one entry per L (hmi@L0, hmi@L2), same fields, and ratios."""
    out = tmp_path / "bench.json"
    result = subprocess.run(hmi_command() + ["bench", "--tenants", "8", "--zipf", "1.0", "--duration", "2",
                                            "--clients", "2", "--systems", "naive,peft,hmi", "--sweep",
                                            "--split-layers", "0,2",
                                            "--model", str(tiny_model_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"naive", "peft", "hmi@L0", "hmi@L2"}
    for name in report["systems"]:
        system = report["systems"][name]
        for field in ("throughput_rps", "p50_ms", "p99_ms", "peak_rss_bytes", "tenants_served"):
            assert system[field] > 0, (name, field)
        assert system["errors"] == 0 and system["sweep_tenants_served"] == 8
    assert set(report["systems"]["hmi@L2"]["service_peak_rss_bytes"]) == {"store", "compute", "gateway"}
    assert report["split_layers"] == [0, 2] and report["recommended"]["split_layer"] == 2   # the tiny model: 4 layers
    assert report["hmi_over_peft_throughput"] > 0
    assert report["over_hmi_at_L0_throughput"]["hmi@L2"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "HMI throughput" in result.stdout and "hmi@L2 throughput" in result.stdout
    assert "recommended setting" in result.stdout
    assert parse_split_layers("0, 3") == [0, 3]
    for bad in ("0,x", "", "3,3", "-1"):
        with pytest.raises(ValueError, match="--split-layers takes"):
            parse_split_layers(bad)


def test_generation_workload_peft_and_hmi_agree_and_the_command_reports_tokens(tmp_path):
    """Greedy generation at split layer 0: PEFT (static batches) and HMI (continuous batching) produce the
    same tokens for the same tenants and prompts; `hmi bench --task generate` reports tokens/s, TTFT, ITL."""
    from hmi.bench.generation_systems import HmiGenerateSystem, PeftGenerateSystem
    from hmi.bench.systems import BenchSettings
    from tests.helpers import tiny_decoder
    model_dir = tiny_decoder("llama", tmp_path / "llama")
    settings = BenchSettings(model_dir=model_dir, split_layer=0)
    requests = make_requests(WorkloadSpec(tenants=4, seed=2), 8)
    outputs = {}
    for system_class in (PeftGenerateSystem, HmiGenerateSystem):
        system = system_class(settings, 4)
        try:
            outputs[system.name] = [system.generate(r.tenant, r.text, 6) for r in requests]
        finally:
            system.close()
    assert [g.tokens for g in outputs["hmi"]] == [g.tokens for g in outputs["peft"]]
    assert all(len(g.token_times) == len(g.tokens) >= 1 for g in outputs["hmi"] + outputs["peft"])

    out = tmp_path / "generate.json"
    result = subprocess.run(hmi_command() + ["bench", "--task", "generate", "--tenants", "4", "--duration", "2",
                                            "--clients", "2", "--max-new-tokens", "4", "--split-layer", "0",
                                            "--model", str(model_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("peft", "hmi"):
        system = report["systems"][name]
        for field in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "throughput_rps", "peak_rss_bytes"):
            assert system[field] > 0, (name, field)
        assert system["errors"] == 0
    assert "hmi_over_peft_tokens_per_s" in report
