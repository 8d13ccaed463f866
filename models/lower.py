"""The lower stacks: a base model's embeddings and layers [0, L), whose layer-L states PLOT stores.

Plain transformers modules, shallow-copied to run only the first L layers (every weight shared with the
base model), so a PLOT row is exactly what the full model's layer L would receive.
"""
from __future__ import annotations

import copy

import torch

from models.families import family


def is_decoder_base(model) -> bool:
    return family(model.config.model_type).decoder


def with_layers(model, layers: list[torch.nn.Module]):
    """A shallow copy of a transformers BERT whose encoder runs `layers`; every other module is shared."""
    copied = copy.copy(model)
    copied._modules = dict(model._modules)
    encoder = copy.copy(model.encoder)
    encoder._modules = dict(model.encoder._modules)
    encoder.layer = torch.nn.ModuleList(layers)
    copied.encoder = encoder
    return copied


def with_decoder_layers(model, split_layer: int):
    """A shallow copy of a GPT2Model / LlamaModel running blocks [0, L) and no final norm, so its last hidden
    state is the residual stream that block L reads (what the upper layers in compute take as input)."""
    copied = copy.copy(model)
    copied._modules = dict(model._modules)
    found = family(model.config.model_type)
    blocks, norm = found.blocks, found.final_norm
    copied._modules[blocks] = torch.nn.ModuleList(list(getattr(model, blocks))[:split_layer])
    copied._modules[norm] = torch.nn.Identity()
    return copied


def lower_model(model, split_layer: int):
    """The same transformers model with only layers [0, L): shares every weight, runs only what PLOT needs."""
    if is_decoder_base(model):
        return with_decoder_layers(model, split_layer)
    return with_layers(model, list(model.encoder.layer)[:split_layer])


def pad_batch(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, T] and their attention mask."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return input_ids, mask


@torch.inference_mode()
def lower_states(model, batch: list[list[int]], split_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-L hidden states [B, T, H] of right-padded sequences and their mask."""
    input_ids, mask = pad_batch(batch)
    if is_decoder_base(model):   # right padding: a causal model's real tokens never see it
        output = lower_model(model, split_layer)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return output.last_hidden_state, mask
    output = lower_model(model, split_layer)(input_ids=input_ids, attention_mask=mask,
                                             token_type_ids=torch.zeros_like(input_ids))
    return output.last_hidden_state, mask
