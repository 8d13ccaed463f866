"""A decoder base model's upper layers (GPT-2 or Llama family) over the packed new tokens of many
sequences, each with its own KV cache: one step of continuous batching.

A step mixes sequences in prefill (a chunk of their prompt) with sequences decoding one token; every
projection runs once over all new tokens with the shared weights, each tenant's LoRA is added by
segment (lora.py), and attention runs per sequence over its cache. Sequences are ordered by entry layer
(their domain's split layer), so the tokens active at layer i are a prefix (active_prefix.py).

Positions: GPT-2 adds learned position embeddings to the input (so PLOT vectors carry them, and the
store's position offsets apply as for BERT); Llama has none in the residual stream and rotates queries
and keys by their true positions inside every upper layer, so a PLOT vector needs no position at all.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.active_prefix import ActivePrefix, run_active_prefix
from models.dims import ModelDims
from models.families import family
from models.kv_cache import ContiguousKV, KVCache, StepKV, cache_bytes_per_token  # noqa: F401 - re-exported
from models.loading import load_causal_lm
from models.lora import LayerLoRA, LoRAWeights
from models.low_precision import DECODER_WEIGHTS, to_bfloat16
from models.packing import PackedInputs


class DecoderModel:
    def __init__(self, model_dir: Path, device: torch.device, weights: str = "float32") -> None:
        """`weights`: "float32" (exact), or "bfloat16" for the shared projections and LM head
        (models/low_precision.py; Llama family)."""
        self.dims = ModelDims.from_dir(model_dir)
        if not self.dims.is_decoder:
            raise ValueError(f"{model_dir} is a {self.dims.family} model, not a decoder")
        if weights not in DECODER_WEIGHTS:
            raise ValueError(f"decoder weights {weights!r} are not one of {', '.join(DECODER_WEIGHTS)}")
        self.device = device
        self.family = self.dims.family
        self.declared = family(self.family)      # its wiring and its block (models/families)
        self.weights = weights
        self._attach(load_causal_lm(model_dir).to(device))
        if weights == "bfloat16":
            self._base_weights_to_bfloat16()
        config = self.model.config
        self.act = ACT2FN[self.declared.hooks["activation"](config)]
        self.group = self.dims.heads // self.dims.kv_heads
        self.scaling = self.dims.head_dim ** -0.5
        if "check" in self.declared.hooks:
            self.declared.hooks["check"](config)

    def _base_weights_to_bfloat16(self) -> None:
        projections = [module for block in self.blocks for module in block.children()]
        if not to_bfloat16(projections):
            raise ValueError(f"bfloat16 decoder weights need nn.Linear projections; the {self.family} family's "
                             f"are not (serve it with float32 weights)")
        to_bfloat16([self.model])      # the LM head (a tied embedding keeps its fp32 table for lookups)

    def _attach(self, model) -> None:
        self.model = model
        self.base = getattr(model, self.declared.base)
        self.blocks = getattr(self.base, self.declared.blocks)

    def with_weights(self, model) -> "DecoderModel":
        """This model computing with another transformers model of the same architecture (for example a copy
        with a LoRA merged into its weights)."""
        other = copy.copy(self)
        other._attach(model)
        return other

    # ---- inputs and outputs ------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer-0 input of packed tokens (GPT-2: token + position embedding; Llama: token embedding)."""
        return self.declared.hooks["embed"](self.base, token_ids, positions)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from each sequence's last hidden state (final norm, then the LM head)."""
        norm = getattr(self.base, self.declared.final_norm)
        return self.model.lm_head(norm(last_hidden))

    def new_cache(self, first_layer: int, capacity: int) -> KVCache:
        shape = (self.dims.kv_heads, capacity, self.dims.head_dim)
        layers = range(first_layer, self.dims.layers)
        return KVCache(first_layer, [torch.empty(shape, device=self.device) for _ in layers],
                       [torch.empty(shape, device=self.device) for _ in layers])

    # ---- the step ----------------------------------------------------------------------------

    def run(self, inputs: PackedInputs, kv: StepKV | list[KVCache], lora: LoRAWeights) -> torch.Tensor:
        """Hidden states after the last layer for every new token (inputs.hidden: the new tokens of each sequence,
        after the `lengths` its KV already holds); writes the new keys/values. Per-sequence caches (a list of
        `KVCache`) are advanced past the new tokens; a paged view's lengths are its scheduler's to keep."""
        bounds = inputs.bounds
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        contiguous = isinstance(kv, list)
        view = ContiguousKV(kv) if contiguous else kv
        positions = torch.cat([torch.arange(first, first + n) for first, n in zip(view.starts, lengths)]
                              ).to(self.device)

        def step(prefix: ActivePrefix, x: torch.Tensor) -> torch.Tensor:
            tenant_lora = LayerLoRA(lora, prefix.layer, inputs.segments.within(prefix.tokens))
            return self._block(tenant_lora, self.blocks[prefix.layer], x, bounds[:prefix.sequences + 1],
                               view, positions[:prefix.tokens])

        hidden = run_active_prefix(inputs.hidden, bounds, inputs.entry_layers, len(self.blocks), step)
        if contiguous:
            view.advance(lengths)
        return hidden

    def _block(self, lora: LayerLoRA, block, x, bounds, kv: StepKV, positions) -> torch.Tensor:
        """One upper layer as the family computes it (models/families/<family>.py: `block`)."""
        return self.declared.hooks["block"](self, lora, block, x, bounds, kv, positions)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.base.rotary_emb(q, positions[None])
        d = self.dims.head_dim
        q4, k4 = q.view(1, -1, self.dims.heads, d).transpose(1, 2), k.view(1, -1, self.dims.kv_heads, d).transpose(1, 2)
        q4, k4 = apply_rotary_pos_emb(q4, k4, cos, sin)
        return q4.transpose(1, 2).reshape(q.shape), k4.transpose(1, 2).reshape(k.shape)

    def attention(self, layer: int, q, k, v, bounds: list[int], kv: StepKV) -> torch.Tensor:
        """Each sequence's new queries over its held and new keys, causal; writes the new keys/values first.
        Sequences decoding one token are attended together (keys padded to the longest), the rest alone."""
        d, heads = self.dims.head_dim, self.dims.heads
        kv.write(layer, k, v, bounds)
        out = torch.empty_like(q)
        decoding: list[int] = []
        for j in range(len(bounds) - 1):
            start, end = bounds[j], bounds[j + 1]
            n, past = end - start, kv.lengths[j]
            if n == 1:
                decoding.append(j)
                continue
            keys, values = kv.read(layer, j, past + n)
            keys, values = self._grouped(keys), self._grouped(values)
            query = q[start:end].view(n, heads, d).transpose(0, 1)
            scores = (query @ keys.transpose(1, 2)) * self.scaling                      # [heads, n, past+n]
            causal = (torch.arange(past + n, device=q.device)[None, :]
                      <= (past + torch.arange(n, device=q.device))[:, None])
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            if kv.tracking:
                kv.observe(layer, [j], probs.view(self.dims.kv_heads, self.group, n, past + n).sum(dim=(1, 2))[None])
            out[start:end] = (probs @ values).transpose(0, 1).reshape(n, heads * d)
        if decoding:
            rows = torch.tensor([bounds[j] for j in decoding], device=q.device)
            lengths = [kv.lengths[j] + 1 for j in decoding]
            width = max(lengths)
            keys, values = kv.read_padded(layer, decoding, lengths)
            keys, values = self._grouped(keys, dim=1), self._grouped(values, dim=1)
            query = q[rows].view(len(decoding), heads, 1, d)
            scores = (query @ keys.transpose(2, 3)) * self.scaling                      # [S, heads, 1, width]
            padding = torch.arange(width, device=q.device)[None, :] >= torch.tensor(lengths, device=q.device)[:, None]
            scores = scores.masked_fill(padding[:, None, None, :], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            if kv.tracking:
                kv.observe(layer, decoding, probs.view(len(decoding), self.dims.kv_heads, self.group, 1, width)
                           .sum(dim=(2, 3)))
            out[rows] = (probs @ values).reshape(len(decoding), heads * d)
        return out

    def _grouped(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Key/value heads repeated for their query heads (grouped-query attention)."""
        return t.repeat_interleave(self.group, dim=dim) if self.group > 1 else t
