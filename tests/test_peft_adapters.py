"""PEFT LoRA folders in and out: adapters made with the `peft` library on the tiny test models, registered from
their folder with `hmi tenant register --adapter DIR`, serve what PeftModel computes in process (1e-4), and
`hmi tenant export --peft DIR` writes folders PeftModel loads to the same model. What cannot be served is
refused with a reason."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from hmi.cli import main as hmi
from models.adapter_format import parse_adapter
from models.dims import ModelDims
from models.lora_merge import merged_model
from models.peft_format import import_peft
from services.common.errors import InvalidArgument

TEXTS = ["the service was quick and friendly", "rain is expected tomorrow", "a great film"]


class MeanPoolClassifier(torch.nn.Module):
    """A BERT classifier whose head reads the mean of the last hidden states, as HMI's heads do."""

    def __init__(self, bert, labels: int) -> None:
        super().__init__()
        self.bert = bert
        self.classifier = torch.nn.Linear(bert.config.hidden_size, labels)

    def forward(self, input_ids):
        hidden = self.bert(input_ids=input_ids).last_hidden_state
        return self.classifier(hidden.mean(1)), hidden.mean(1)


def randomized(model, seed: int):
    """PEFT initialises B to zero (no change at all): give every LoRA matrix and the head random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "classifier" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def gpt2_base():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, bos_token_id=1,
                                      eos_token_id=2)).eval()


# ---- conversion, in process ----------------------------------------------------------------------

def test_gpt2_fused_attention_ranks_and_rslora_convert_exactly(tmp_path):
    """c_attn splits into query/key/value, rank_pattern pads, alpha_pattern and rsLoRA fold into B."""
    base = gpt2_base()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        use_rslora=True, rank_pattern={"c_fc": 2}, alpha_pattern={"c_proj": 3})
    peft_model = randomized(get_peft_model(copy.deepcopy(base), config), seed=1)
    peft_model.save_pretrained(tmp_path / "gpt2")
    converted = import_peft(tmp_path / "gpt2", family="gpt2")
    assert converted.targets == ["attn_out", "ffn_in", "ffn_out", "key", "query", "value"] and converted.rank == 4
    adapter = parse_adapter(converted.adapter, ModelDims.from_config(base.config), num_labels=0)
    ids = torch.tensor([[5, 17, 33, 2, 9, 71]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        served_reference = merged_model(base, adapter)(input_ids=ids).logits
    torch.testing.assert_close(served_reference, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="lora_only"), "bias"),
    (dict(target_modules=["c_attn", "lm_head"]), "cannot be served"),
    (dict(target_modules=["c_attn", "wte"]), "neither a LoRA matrix"),
    (dict(modules_to_save=["ln_f"]), "neither a LoRA matrix"),
])
def test_what_cannot_be_served_is_refused_with_the_reason(tmp_path, change, reason):
    config = LoraConfig(**{"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True, **change})
    get_peft_model(gpt2_base(), config).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match=reason):
        import_peft(tmp_path)


def test_a_sequence_classification_head_is_refused_or_left_out(tmp_path, tiny_model_dir):
    """BertForSequenceClassification's head reads the pooler's [CLS] vector, HMI's the mean: not the same model."""
    from transformers import BertForSequenceClassification
    base = BertForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])).save_pretrained(
        tmp_path)
    with pytest.raises(InvalidArgument, match="SEQ_CLS"):
        import_peft(tmp_path)
    converted = import_peft(tmp_path, keep_head=False)
    assert converted.head_labels == 0 and converted.notes


# ---- through the services --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def domains(front_door):
    client = front_door.client(timeout=60)
    client.build_domain("peft-reviews", "", split_layer=0, context=1, min_count=1)
    client.build_domain("peft-stories-l2", "the service was quick\nrain is expected", split_layer=2, context=1,
                        min_count=1, model="gen")
    client.build_domain("peft-stories", "", split_layer=0, context=1, min_count=1, model="gen")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMI_TOKEN", front_door.admin_token)        # the CLI commands run in this process
        yield front_door, client
    client.close()


def register(services, tenant: str, domain: str, folder, *extra: str) -> int:
    return hmi(["tenant", "register", tenant, "--domain", domain, "--adapter", str(folder), "--gateway",
                services.gateway_addr, *extra])


@pytest.mark.integration
def test_a_peft_bert_classifier_serves_peft_logits_and_exports_back(domains, tiny_model_dir, tokenizer, tmp_path,
                                                                     capsys):
    from models.loading import load_bert
    services, client = domains
    base = MeanPoolClassifier(load_bert(tiny_model_dir), labels=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "attention.output.dense"],
                        layers_to_transform=[1, 2, 3], modules_to_save=["classifier"])
    peft_model = randomized(get_peft_model(copy.deepcopy(base), config), seed=2)
    peft_model.save_pretrained(tmp_path / "bert")
    assert register(services, "peft-critic", "peft-reviews", tmp_path / "bert", "--labels", "a,b,c") == 0
    assert register(services, "peft-embedder", "peft-reviews", tmp_path / "bert", "--no-head") == 0
    served = client.classify("peft-critic", TEXTS)
    vectors = client.embed("peft-embedder", TEXTS)
    for text, prediction, vector in zip(TEXTS, served, vectors):
        with torch.no_grad():
            logits, pooled = peft_model(torch.tensor([tokenizer.encode(text).ids]))
        np.testing.assert_allclose(list(prediction.probabilities.values()), torch.softmax(logits[0], 0).numpy(),
                                   atol=1e-4)
        np.testing.assert_allclose(vector, pooled[0].numpy(), atol=1e-4)

    # Refused before anything is stored: a missing --labels, a rank above the deployment's limit.
    capsys.readouterr()
    assert register(services, "peft-nolabels", "peft-reviews", tmp_path / "bert") == 2
    assert "--labels with 3 names" in capsys.readouterr().err
    get_peft_model(copy.deepcopy(base.bert), LoraConfig(r=32, target_modules=["query"])).save_pretrained(
        tmp_path / "wide")
    assert register(services, "peft-wide", "peft-reviews", tmp_path / "wide") == 1
    assert "rank 32 is above this deployment's limit of 16" in capsys.readouterr().err

    # Export: PeftModel loads the folder on the plain BertModel; the head and labels lie beside it.
    assert hmi(["tenant", "export", "peft-critic", "--peft", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                "--gateway", services.gateway_addr]) == 0
    exported = PeftModel.from_pretrained(load_bert(tiny_model_dir), str(tmp_path / "out")).eval()
    from safetensors.torch import load_file
    head = load_file(str(tmp_path / "out" / "hmi_head.safetensors"))
    assert json.loads((tmp_path / "out" / "hmi_tenant.json").read_text())["labels"] == ["a", "b", "c"]
    for text, prediction in zip(TEXTS, served):
        with torch.no_grad():
            pooled = exported(input_ids=torch.tensor([tokenizer.encode(text).ids])).last_hidden_state.mean(1)[0]
        probabilities = torch.softmax(pooled @ head["weight"].T + head["bias"], 0).numpy()
        np.testing.assert_allclose(list(prediction.probabilities.values()), probabilities, atol=1e-4)
    # ...and the exported folder registers again as the same classifier (labels from hmi_tenant.json).
    assert register(services, "peft-again", "peft-reviews", tmp_path / "out") == 0
    again = client.classify("peft-again", TEXTS)
    for first, second in zip(served, again):
        assert first.probabilities == pytest.approx(second.probabilities, abs=1e-6)


@pytest.mark.integration
def test_a_peft_llama_generates_what_peft_generates_and_exports_back(domains, tiny_llama_dir, tmp_path, capsys):
    from models.loading import load_causal_lm, load_tokenizer
    services, client = domains
    base = load_causal_lm(tiny_llama_dir)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, rank_pattern={"q_proj": 2},
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = randomized(get_peft_model(copy.deepcopy(base), config), seed=3)
    peft_model.save_pretrained(tmp_path / "llama")
    assert register(services, "peft-bard", "peft-stories", tmp_path / "llama") == 0
    capsys.readouterr()      # layers below a domain's split layer come from PLOT: refused before anything is sent
    assert register(services, "peft-low", "peft-stories-l2", tmp_path / "llama") == 2
    assert "layer(s) [0, 1], below domain 'peft-stories-l2''s split layer 2" in capsys.readouterr().err
    tokenizer = load_tokenizer(tiny_llama_dir)
    prompt = "the service was"
    ids = torch.tensor([tokenizer.encode(prompt).ids])

    def peft_tokens(model) -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 min_new_tokens=12, do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    expected = peft_tokens(peft_model)
    assert client.generate("peft-bard", prompt, max_new_tokens=12).collect().token_ids == expected
    # The converted adapter is the same model, logit for logit.
    adapter = parse_adapter(client.get_adapter("peft-bard"), ModelDims.from_dir(tiny_llama_dir), num_labels=0)
    with torch.no_grad():
        torch.testing.assert_close(merged_model(base, adapter)(input_ids=ids).logits,
                                   peft_model(input_ids=ids).logits, atol=1e-4, rtol=0)
    assert hmi(["tenant", "export", "peft-bard", "--peft", str(tmp_path / "out"), "--model", str(tiny_llama_dir),
                "--gateway", services.gateway_addr]) == 0
    exported = PeftModel.from_pretrained(load_causal_lm(tiny_llama_dir), str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4,
                                   rtol=0)
    assert peft_tokens(exported) == expected
