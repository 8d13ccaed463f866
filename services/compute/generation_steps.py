"""The tensor side of continuous batching: one decoder step over the sequences a `StepPlan` feeds.

Packs the fed tokens of every sequence (embeddings at split layer 0, else PLOT rows: a prompt's were
fetched when it was submitted, a generated token's come from one lookup per domain by its left context, and
each is kept so a preempted sequence recomputes from them), runs the upper layers over the paged KV pool
(models/kv_cache.py) with each sequence's block table and tenant LoRA, and samples the next token of the
sequences that fed their last pending one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.decoder import DecoderModel
from models.kv_cache import KVPool, PagedKV
from models.packing import PackedLayout, pack_inputs, plot_rows
from services.common.limits import MAX_CONTEXT
from services.compute.adapter_pool import AdapterPool
from services.compute.constrained_output import OutputGuide
from services.compute.generation_scheduler import Compaction, ScheduledSequence, StepPlan
from services.compute.sampling import penalise, sample

# (domain, token windows, first position of each window, leading context-only tokens per window)
#   -> layer-L rows (fp16) of each window's other tokens
PlotLookup = Callable[[str, list[np.ndarray], list[int], list[int]], list[np.ndarray]]

RECENT_SHARE = 0.25     # of a KV budget kept as the most recent tokens; the rest are heavy hitters

@dataclass
class TokenLogprob:
    """A token's log-probability under the tenant's model, and the likeliest tokens at its position."""
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SampledDetails:
    """What a sampled token is streamed with when log-probabilities were asked for."""
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] | None = None     # prompt tokens 1.. (with the first generated token)


@dataclass
class SequenceTensors:
    """An admitted sequence's own state besides its KV blocks: its sampler, and (above split layer 0) the PLOT
    rows of its tokens known so far (the prompt's, then each generated token's as it is fed)."""
    generator: torch.Generator
    rows: np.ndarray | None = None                        # [prompt + max new tokens, hidden] fp16
    known: int = 0                                        # tokens whose rows are in `rows`
    prompt_logprobs: list[TokenLogprob] | None = None     # collected chunk by chunk while the prompt is fed
    scores: torch.Tensor | None = None                    # under a KV budget: [layers, kv_heads, length] attention
    origins: torch.Tensor | None = None                   # received; and each slot's token position (same shape)
    preemptions: int = 0                                  # of the sequence when `scores` was started
    guide: OutputGuide | None = None                      # structured output: where its text is in the pattern


def token_logprob(log_probs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`log_probs` [vocab] (log-softmax of the logits) -> the token's and the `top` likeliest."""
    best = torch.topk(log_probs, top) if top > 0 else None
    return TokenLogprob(float(log_probs[token]), best.indices.tolist() if best is not None else [],
                        best.values.tolist() if best is not None else [])


class StepRunner:
    def __init__(self, model: DecoderModel, pool: AdapterPool, plot: PlotLookup | None, kv: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.plot = plot
        self.kv = kv

    def admit(self, sequence: ScheduledSequence) -> None:
        """Its sampler and, above split layer 0, room for its tokens' PLOT rows, starting with the prompt's."""
        request = sequence.request
        state = SequenceTensors(torch.Generator().manual_seed(request.params.seed),
                                prompt_logprobs=[] if request.params.prompt_logprobs else None)
        if request.output_index is not None:
            state.guide = OutputGuide(request.output_index, self.model.dims.vocab, request.output_eos)
        if sequence.prompt_rows is not None:   # done: admission waited for it
            prompt_rows = np.asarray(sequence.prompt_rows.result()[0])
            state.rows = np.empty((len(request.prompt) + request.params.max_new_tokens, prompt_rows.shape[1]),
                                  dtype=prompt_rows.dtype)
            state.rows[:len(prompt_rows)] = prompt_rows
            state.known = len(prompt_rows)
        sequence.state = state

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[dict[ScheduledSequence, int], dict[ScheduledSequence, SampledDetails]]:
        """Runs the step; returns the sampled token of every sequence that fed its last pending token, and the
        log-probabilities of those that asked for them."""
        sequences = plan.sequences
        lease = self.pool.acquire([(s.request.tenant_id, s.request.adapter_version) for s in sequences])
        try:
            layout = PackedLayout.of([s.request.split_layer for s in sequences],
                                     [lease.slots[(s.request.tenant_id, s.request.adapter_version)] for s in sequences],
                                     [plan.feeds[s] for s in sequences])
            ordered = [sequences[i] for i in layout.order]
            states: list[SequenceTensors] = [s.state for s in ordered]
            fed_from = [s.computed for s in ordered]                   # each sequence's first fed position
            rows = self._plot_rows(ordered, fed_from, layout.lengths)
            inputs = pack_inputs(layout, hidden_size=self.model.dims.hidden, device=self.model.device,
                                 embed=self.model.embed,
                                 token_ids_of=lambda j: np.asarray(ordered[j].pending[:layout.lengths[j]]),
                                 first_position_of=fed_from.__getitem__, plot=plot_rows(layout, rows.__getitem__))
            held, blocks = [], []
            for sequence in ordered:
                compaction = plan.compactions.get(sequence)
                if compaction is not None:
                    self._compact(sequence, compaction)
                held.append(compaction.keep if compaction is not None else sequence.held)
                blocks.append([block.units for block in (compaction or sequence).blocks])
            kv = PagedKV(self.kv, self.model.dims.layers, held, [s.request.split_layer for s in ordered], blocks,
                         layout.lengths, starts=fed_from, scores=[self._scores(s) for s in ordered])
            out = self.model.run(inputs, kv, self.pool.slot_tensors().lora)
            last = torch.tensor([end - 1 for end in inputs.bounds[1:]], device=out.device)
            logits = self.model.logits(out[last]).float().cpu()
            for j, sequence in enumerate(ordered):     # the prompt's own tokens, chunk by chunk, when asked for
                if states[j].prompt_logprobs is not None and fed_from[j] < len(sequence.request.prompt):
                    self._prompt_logprobs(sequence, states[j], out[inputs.bounds[j]:inputs.bounds[j + 1]],
                                          fed_from[j])
        finally:
            lease.release()
        sampled, details = {}, {}
        for j, s in enumerate(ordered):
            if not plan.samples(s):
                continue
            forced = s.request.params.forced_tokens
            scores = (penalise(logits[j], s.request.params, s.request.prompt, s.tokens[len(s.request.prompt):])
                      if s.request.params.penalised else logits[j])
            guide = states[j].guide
            if guide is not None:
                scores = guide.mask(scores)
            token = (forced[s.generated] if s.generated < len(forced)
                     else sample(scores, s.request.params, states[j].generator))
            if guide is not None:
                guide.advance(token)
            sampled[s] = token
            params = s.request.params
            if params.logprobs or params.prompt_logprobs:
                found = SampledDetails()
                if params.logprobs:
                    found.logprob = token_logprob(torch.log_softmax(logits[j].double(), -1), token,
                                                  params.top_logprobs)
                if states[j].prompt_logprobs is not None:
                    found.prompt_logprobs, states[j].prompt_logprobs = states[j].prompt_logprobs, None
                details[s] = found
        return sampled, details

    def _scores(self, sequence: ScheduledSequence) -> torch.Tensor | None:
        """The attention its held keys received so far, per layer (sequences under a KV budget); started
        afresh when a preemption made it recompute its tokens."""
        state: SequenceTensors = sequence.state
        if not sequence.request.params.kv_budget:
            return None
        if state.scores is None or state.preemptions != sequence.preemptions:
            request = sequence.request
            state.scores = torch.zeros(self.model.dims.layers, self.model.dims.kv_heads,
                                       len(request.prompt) + request.params.max_new_tokens, device=self.model.device)
            positions = torch.arange(state.scores.shape[2], device=self.model.device)
            state.origins = positions.expand_as(state.scores).clone()
            state.preemptions = sequence.preemptions
        return state.scores

    def _compact(self, sequence: ScheduledSequence, compaction: Compaction) -> None:
        """Copies the tokens a KV budget keeps into the compaction's blocks, per layer and key/value head (as
        H2O chooses them): the most recent quarter of the budget (`RECENT_SHARE`), and the earlier tokens that
        received the most attention per query that saw them from that head's queries (its heavy hitters). Per
        query, not in total: a total favours early tokens, which every later query could attend
        (docs/performance.md measures both)."""
        scores = self._scores(sequence)
        state: SequenceTensors = sequence.state
        keep, held, size = compaction.keep, compaction.held, self.kv.block_tokens
        recent = int(keep * RECENT_SHARE)
        device = scores.device
        now = sequence.computed
        old = torch.tensor([block.units for block in sequence.blocks], device=device)        # [blocks, layers]
        new = torch.tensor([block.units for block in compaction.blocks], device=device)
        first = sequence.request.split_layer
        slots = torch.arange(keep, device=device)
        heads = scores.shape[1]
        window = torch.arange(held - recent, held, device=device).expand(heads, -1)
        for slot, layer in enumerate(range(first, self.model.dims.layers)):
            ranked = scores[layer, :, :held - recent] / (now - state.origins[layer, :, :held - recent]).clamp(min=1)
            heavy = torch.topk(ranked, keep - recent, dim=-1).indices.sort(dim=-1).values
            kept = torch.cat([heavy, window], dim=1)                                          # [heads, keep]
            self.kv.copy_head_tokens((old[kept // size, slot], kept % size), (new[slots // size, slot], slots % size))
            scores[layer, :, :keep] = scores[layer].gather(1, kept)
            scores[layer, :, keep:held] = 0
            state.origins[layer, :, :keep] = state.origins[layer].gather(1, kept)
            state.origins[layer, :, keep:] = torch.arange(now, now + scores.shape[2] - keep, device=device)

    def _prompt_logprobs(self, sequence: ScheduledSequence, state: SequenceTensors, hidden: torch.Tensor,
                         start: int) -> None:
        """Each fed prompt position's prediction of the next prompt token (the last one's predicts the first
        generated token, which its own log-probability covers); positions recomputed after a preemption were
        collected already."""
        prompt = sequence.request.prompt
        begin = max(start, len(state.prompt_logprobs))
        end = min(start + len(hidden), len(prompt) - 1)
        if end <= begin:
            return
        log_probs = torch.log_softmax(self.model.logits(hidden[begin - start:end - start]).double().cpu(), -1)
        top = sequence.request.params.top_logprobs
        for offset in range(end - begin):
            state.prompt_logprobs.append(token_logprob(log_probs[offset], int(prompt[begin + offset + 1]), top))

    def _plot_rows(self, ordered: list[ScheduledSequence], fed_from: list[int], lengths: list[int]
                   ) -> dict[int, np.ndarray]:
        """Layer-L rows of the fed tokens of every sequence above split layer 0, by execution position: those
        known (the prompt's, fetched at submit, and generated tokens fed before) from the sequence's own rows,
        the rest (a generated token fed for the first time) from one lookup per domain by its left context."""
        rows: dict[int, np.ndarray] = {}
        by_domain: dict[str, list[int]] = {}
        for j, sequence in enumerate(ordered):
            if sequence.request.split_layer == 0:
                continue
            state: SequenceTensors = sequence.state
            if fed_from[j] + lengths[j] <= state.known:
                rows[j] = state.rows[fed_from[j]:fed_from[j] + lengths[j]]
            else:
                by_domain.setdefault(sequence.request.domain, []).append(j)
        for domain, members in by_domain.items():
            windows, firsts, skips = [], [], []
            for j in members:
                tokens, end = ordered[j].tokens, fed_from[j] + lengths[j]
                start = max(0, end - MAX_CONTEXT)
                windows.append(np.asarray(tokens[start:end], dtype=np.int32))
                firsts.append(start)
                skips.append(ordered[j].state.known - start)
            for j, found in zip(members, self.plot(domain, windows, firsts, skips)):
                state = ordered[j].state
                end = fed_from[j] + lengths[j]
                state.rows[state.known:end] = np.asarray(found)
                state.known = end
                rows[j] = state.rows[fed_from[j]:end]
        return rows
