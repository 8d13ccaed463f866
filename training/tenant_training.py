"""`hmi tenant train`: labeled JSONL (classifiers) or plain text (generative tenants) in, a trained
adapter registered for the tenant out.

Runs where the CLI runs (CPU is enough for a few thousand examples): tokenises with the base model's
tokenizer, fetches the domain's PLOT vectors through the gateway (the inputs serving will see), trains,
reports eval accuracy (or perplexity), then registers or replaces the tenant without restarting anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hmi_errors import InvalidArgument
from models.adapter_format import serialize_adapter
from models.decoder import DecoderModel
from models.encoder import EncoderModel
from models.loading import load_tokenizer
from models.split_defaults import tenant_targets
from training.causal_trainer import CausalTrainer, CausalTrainSettings, TextExample
from training.trainer import AdapterTrainer, Example, TrainSettings


@dataclass
class TrainReport:
    train_examples: int
    eval_examples: int
    eval_accuracy: float
    final_loss: float
    labels: list[str]
    adapter: bytes


def read_labeled(path: Path, limit: int = 0) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, label = record["text"], record["label"]
            except (ValueError, KeyError, TypeError) as error:
                raise InvalidArgument(f"{path}:{number}: expected a JSON object with \"text\" and \"label\" "
                                      f"({error})") from error
            if not isinstance(text, str) or not text.strip():
                raise InvalidArgument(f"{path}:{number}: empty text")
            rows.append((text, str(label)))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise InvalidArgument(f"{path} holds no examples")
    return rows


def encode(tokenizer, texts: list[str], max_tokens: int) -> list[np.ndarray]:
    """Token ids as the gateway makes them; over-long texts keep their head and the final [SEP]."""
    result = []
    for encoding in tokenizer.encode_batch(texts):
        ids = encoding.ids if len(encoding.ids) <= max_tokens else encoding.ids[:max_tokens - 1] + encoding.ids[-1:]
        result.append(np.asarray(ids, dtype=np.int32))
    return result


def build_examples(client, tokenizer, domain: str, split_layer: int, rows: list[tuple[str, str]],
                   label_index: dict[str, int], max_tokens: int) -> list[Example]:
    unknown = sorted({label for _, label in rows} - set(label_index))
    if unknown:
        raise InvalidArgument(f"labels {unknown[:5]} in the data are not among --labels {list(label_index)}")
    ids = encode(tokenizer, [text for text, _ in rows], max_tokens)
    vectors: list[np.ndarray | None] = [None] * len(ids)
    if split_layer > 0:   # through the domain's bridge, if it has one: what compute's upper layers receive
        for start in range(0, len(ids), 512):
            vectors[start:start + 512] = client.lookup(domain, ids[start:start + 512], bridged=True)
    return [Example(i, v, label_index[label]) for i, v, (_, label) in zip(ids, vectors, rows)]


def train_tenant(client, model_dir: Path, domain: str, train_path: Path, eval_path: Path | None,
                 labels: list[str] | None, *, epochs: int = 3, rank: int = 8, learning_rate: float = 2e-3,
                 batch_size: int = 32, max_train: int = 0, max_tokens: int = 128, seed: int = 0,
                 targets: tuple[str, ...] = (),
                 progress: Callable[[int, int, float], None] | None = None) -> TrainReport:
    """Trains a classifier tenant; `targets` empty: what the domain's split recommends (`tenant_targets`)."""
    record = client.get_domain(domain)
    split_layer = record.spec.split_layer
    train_rows = read_labeled(train_path, max_train)
    eval_rows = read_labeled(eval_path) if eval_path else []
    labels = labels or sorted({label for _, label in train_rows})
    if len(labels) < 2:
        raise InvalidArgument(f"need at least 2 labels, the training data has {labels}")
    label_index = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(model_dir)
    train = build_examples(client, tokenizer, domain, split_layer, train_rows, label_index, max_tokens)
    evaluation = build_examples(client, tokenizer, domain, split_layer, eval_rows, label_index, max_tokens)
    model = EncoderModel(model_dir, torch.device("cpu"))
    trainer = AdapterTrainer(model, TrainSettings(split_layer=split_layer, num_labels=len(labels), rank=rank,
                                                  alpha=2.0 * rank, epochs=epochs, batch_size=batch_size,
                                                  learning_rate=learning_rate, seed=seed,
                                                  targets=targets or tenant_targets(model.dims, split_layer)))
    loss = trainer.fit(train, progress)
    accuracy = trainer.accuracy(evaluation)
    return TrainReport(len(train), len(evaluation), accuracy, loss, labels, serialize_adapter(trainer.adapter()))


@dataclass
class TextTrainReport:
    train_texts: int
    eval_texts: int
    base_perplexity: float       # held-out, the base model alone (same PLOT inputs)
    eval_perplexity: float       # held-out, with the trained adapter
    final_loss: float
    adapter: bytes


def read_texts(path: Path, limit: int = 0) -> list[str]:
    """One text per non-empty line (a JSONL line with a "text" field also works)."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    line = str(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    pass
            texts.append(line)
            if limit and len(texts) >= limit:
                break
    if not texts:
        raise InvalidArgument(f"{path} holds no text")
    return texts


def build_text_examples(client, tokenizer, domain: str, split_layer: int, texts: list[str],
                        max_tokens: int) -> list[TextExample]:
    """Texts of at least two tokens, cut at max_tokens, with the PLOT rows serving would use (prefill)."""
    ids = [np.asarray(e.ids[:max_tokens], dtype=np.int32) for e in tokenizer.encode_batch(texts)]
    ids = [i for i in ids if len(i) >= 2]
    vectors: list[np.ndarray | None] = [None] * len(ids)
    if split_layer > 0:
        for start in range(0, len(ids), 512):
            vectors[start:start + 512] = client.lookup(domain, ids[start:start + 512])
    return [TextExample(i, v) for i, v in zip(ids, vectors)]


def train_generative_tenant(client, model_dir: Path, domain: str, train_path: Path, eval_path: Path | None, *,
                            epochs: int = 1, rank: int = 8, learning_rate: float = 1e-3, batch_size: int = 8,
                            max_train: int = 0, max_tokens: int = 64, max_steps: int = 0, seed: int = 0,
                            targets: tuple[str, ...] = (),
                            progress: Callable[[int, int, float], None] | None = None) -> TextTrainReport:
    split_layer = client.get_domain(domain).spec.split_layer
    model = DecoderModel(model_dir, torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    train = build_text_examples(client, tokenizer, domain, split_layer, read_texts(train_path, max_train), max_tokens)
    evaluation = build_text_examples(client, tokenizer, domain, split_layer, read_texts(eval_path), max_tokens) \
        if eval_path else []
    trainer = CausalTrainer(model,
                            CausalTrainSettings(split_layer=split_layer, rank=rank, alpha=2.0 * rank,
                                                targets=targets or tenant_targets(model.dims, split_layer),
                                                epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                                seed=seed, max_steps=max_steps))
    base = trainer.perplexity(evaluation, with_adapter=False)
    loss = trainer.fit(train, progress)
    return TextTrainReport(len(train), len(evaluation), base, trainer.perplexity(evaluation), loss,
                           serialize_adapter(trainer.adapter()))
