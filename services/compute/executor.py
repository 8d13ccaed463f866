"""Executes one prepared batch: order by entry layer and tenant, run the upper layers, pool, heads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.lora import find_segments
from kernels.plot_gather import gather
from kernels.runtime import cuda_available
from kernels.tenant_head import tenant_heads
from services.compute.adapter_pool import AdapterPool, Lease
from services.compute.batch import BatchResult, PackedBatch
from services.compute.model_split import LayerInputs, UpperModel


@dataclass
class StagedRows:
    """A batch's PLOT rows already on the device (copied on a side stream on CUDA) and where they go."""
    rows: torch.Tensor                 # fp16 [n, H]
    dest: torch.Tensor                 # int64 [n]: row positions in the packed hidden states
    ready: object | None = None        # torch.cuda.Event recorded after the copy (CUDA only)


@dataclass
class PreparedBatch:
    """A batch whose PLOT vectors and adapters are in place: only device work is left."""
    batch: PackedBatch
    plot_rows: dict[int, np.ndarray]   # sequence index -> fp16 [len, H] layer-L vectors (split layer > 0)
    lease: Lease
    staged: StagedRows | None = None


class Executor:
    def __init__(self, model: UpperModel, pool: AdapterPool) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.use_kernels = self.device.type == "cuda" and cuda_available()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def execution_order(self, prepared: PreparedBatch) -> list[int]:
        slots = prepared.lease.slots
        specs = prepared.batch.sequences
        return sorted(range(len(specs)), key=lambda i: (specs[i].split_layer,
                                                        slots[(specs[i].tenant_id, specs[i].adapter_version)]))

    def layout(self, prepared: PreparedBatch) -> tuple[list[int], list[int], list[int]]:
        """Execution order, sequence lengths in that order, and their n+1 bounds in the packed buffer."""
        batch = prepared.batch
        order = self.execution_order(prepared)
        lengths = [int(batch.offsets[i + 1] - batch.offsets[i]) for i in order]
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()
        return order, lengths, bounds

    @torch.inference_mode()
    def stage(self, prepared: PreparedBatch) -> None:
        """The copy stage, run by the preparing thread: every PLOT row of the batch in one host-to-device
        copy (a side CUDA stream, so it overlaps the batch executing now), with the positions it goes to."""
        order, _lengths, bounds = self.layout(prepared)
        specs = [prepared.batch.sequences[i] for i in order]
        plot_seqs = [j for j, spec in enumerate(specs) if spec.split_layer > 0]
        if not plot_seqs:
            return
        rows = torch.from_numpy(np.concatenate([prepared.plot_rows[order[j]] for j in plot_seqs]))
        dest = torch.cat([torch.arange(bounds[j], bounds[j + 1]) for j in plot_seqs])
        if self.copy_stream is None:
            prepared.staged = StagedRows(rows, dest)
            return
        with torch.cuda.stream(self.copy_stream):
            staged = StagedRows(rows.pin_memory().to(self.device, non_blocking=True),
                                dest.pin_memory().to(self.device, non_blocking=True), torch.cuda.Event())
            staged.ready.record(self.copy_stream)
        prepared.staged = staged

    @torch.inference_mode()
    def run(self, prepared: PreparedBatch) -> BatchResult:
        batch = prepared.batch
        order, lengths, bounds = self.layout(prepared)
        specs = [batch.sequences[i] for i in order]
        total = bounds[-1]
        hidden = torch.empty(total, self.model.dims.hidden, dtype=torch.float32, device=self.device)

        embed_positions = [j for j, spec in enumerate(specs) if spec.split_layer == 0]
        if embed_positions:
            ids = torch.from_numpy(np.concatenate([batch.tokens_of(order[j]) for j in embed_positions])
                                   .astype(np.int64)).to(self.device)
            positions = torch.cat([torch.arange(lengths[j]) for j in embed_positions]).to(self.device)
            embedded = self.model.embed(ids, positions)
            cursor = 0
            for j in embed_positions:
                hidden[bounds[j]:bounds[j + 1]] = embedded[cursor:cursor + lengths[j]]
                cursor += lengths[j]
        if prepared.staged is None:
            self.stage(prepared)
        staged = prepared.staged
        if staged is not None:   # one gather of every PLOT row into place
            if staged.ready is not None:
                compute_stream = torch.cuda.current_stream(self.device)
                compute_stream.wait_event(staged.ready)
                staged.rows.record_stream(compute_stream)   # allocated on the copy stream, freed after use here
                staged.dest.record_stream(compute_stream)
            gather(hidden, staged.rows.to(self.device), staged.dest.to(self.device))

        slot_of_seq = [prepared.lease.slots[(s.tenant_id, s.adapter_version)] for s in specs]
        slot_per_token = [slot for slot, length in zip(slot_of_seq, lengths) for _ in range(length)]
        segments = find_segments(slot_per_token, bounds)
        slot_ranks = None
        if self.use_kernels:
            segments, slot_ranks = segments.on_device(total, self.device), self.pool.slot_ranks
        inputs = LayerInputs(hidden=hidden, seq_bounds=bounds, entry_layers=[s.split_layer for s in specs],
                             segments=segments, slot_ranks=slot_ranks)
        hidden = self.model.run(inputs, self.pool.lora_a, self.pool.lora_b)

        seq_index = torch.repeat_interleave(torch.arange(len(specs), device=self.device),
                                            torch.tensor(lengths, device=self.device))
        pooled = torch.zeros(len(specs), hidden.shape[1], device=self.device).index_add_(0, seq_index, hidden)
        pooled /= torch.tensor(lengths, device=self.device, dtype=torch.float32)[:, None]

        logits: list[np.ndarray] = [np.empty(0, np.float32)] * len(specs)
        if batch.want_logits:
            seq_slot = torch.tensor(slot_of_seq, dtype=torch.int32, device=self.device)
            seq_labels = self.pool.slot_labels[seq_slot.long()]
            all_logits = tenant_heads(pooled, self.pool.head_weight, self.pool.head_bias, seq_slot, seq_labels)
            labels = seq_labels.tolist()
            all_logits = all_logits.cpu().numpy()
            for j in range(len(specs)):
                logits[order[j]] = all_logits[j, :labels[j]]
        embeddings = None
        if batch.want_embeddings:
            restore = np.empty(len(order), dtype=np.int64)
            restore[order] = np.arange(len(order))
            embeddings = pooled[torch.from_numpy(restore).to(self.device)].cpu().numpy()
        return BatchResult(logits=logits if batch.want_logits else [], embeddings=embeddings)
