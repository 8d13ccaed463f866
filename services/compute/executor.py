"""Executes one prepared classification batch: pack its inputs, run the upper layers, pool, apply heads."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hmi_kernels.tenant_head import tenant_heads
from models.bridge import DomainBridge, apply_bridges
from models.encoder import EncoderModel
from models.packing import PackedLayout, PlotRows, pack_inputs, plot_rows
from services.compute.adapter_pool import AdapterPool, Lease
from services.compute.batch import BatchResult, PackedBatch


@dataclass
class PreparedBatch:
    """A batch whose PLOT vectors and adapters are in place: only device work is left."""
    batch: PackedBatch
    plot_rows: dict[int, np.ndarray]   # sequence index -> fp16 [len, H] layer-L vectors (split layer > 0)
    lease: Lease
    staged: PlotRows | None = None     # the PLOT rows already copied towards the device (stage)
    bridges: dict[int, DomainBridge] = field(default_factory=dict)   # sequence index -> its domain's bridge

    def subset(self, indices: list[int]) -> "PreparedBatch":
        """Some of its sequences (a chunk), sharing the lease; their rows are staged again when it runs."""
        return PreparedBatch(self.batch.subset(indices),
                             {new: self.plot_rows[old] for new, old in enumerate(indices) if old in self.plot_rows},
                             self.lease,
                             bridges={new: self.bridges[old] for new, old in enumerate(indices) if old in self.bridges})

    def layout(self) -> PackedLayout:
        """Execution order (by split layer, then adapter slot) and bounds of the packed sequences."""
        specs, slots = self.batch.sequences, self.lease.slots
        return PackedLayout.of([s.split_layer for s in specs], [slots[(s.tenant_id, s.adapter_version)] for s in specs],
                               np.diff(self.batch.offsets).tolist())


class Executor:
    def __init__(self, model: EncoderModel, pool: AdapterPool) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @torch.inference_mode()
    def stage(self, prepared: PreparedBatch) -> None:
        """The copy stage, run by the preparing thread: every PLOT row of the batch in one host-to-device
        copy (a side CUDA stream, so it overlaps the batch executing now), with the positions it goes to."""
        layout = prepared.layout()
        staged = plot_rows(layout, lambda j: prepared.plot_rows[layout.order[j]])
        if staged is None or self.copy_stream is None:
            prepared.staged = staged
            return
        with torch.cuda.stream(self.copy_stream):
            staged = PlotRows(staged.rows.pin_memory().to(self.device, non_blocking=True),
                              staged.dest.pin_memory().to(self.device, non_blocking=True), torch.cuda.Event())
            staged.ready.record(self.copy_stream)
        prepared.staged = staged

    @torch.inference_mode()
    def run(self, prepared: PreparedBatch) -> BatchResult:
        batch = prepared.batch
        layout = prepared.layout()
        order, lengths = layout.order, layout.lengths
        if prepared.staged is None:
            self.stage(prepared)
        inputs = pack_inputs(layout, hidden_size=self.model.dims.hidden, device=self.device, embed=self.model.embed,
                             token_ids_of=lambda j: batch.tokens_of(order[j]), first_position_of=lambda j: 0,
                             plot=prepared.staged)
        apply_bridges(inputs.hidden, layout, lambda j: prepared.bridges.get(order[j]))
        tensors = self.pool.slot_tensors()
        hidden = self.model.run(inputs, tensors.lora)

        sequences = len(order)
        seq_index = torch.repeat_interleave(torch.arange(sequences, device=self.device),
                                            torch.tensor(lengths, device=self.device))
        pooled = torch.zeros(sequences, hidden.shape[1], device=self.device).index_add_(0, seq_index, hidden)
        pooled /= torch.tensor(lengths, device=self.device, dtype=torch.float32)[:, None]

        logits: list[np.ndarray] = [np.empty(0, np.float32)] * sequences
        if batch.want_logits:
            seq_slot = torch.tensor(layout.slots, dtype=torch.int32, device=self.device)
            seq_labels = tensors.slot_labels[seq_slot.long()]
            all_logits = tenant_heads(pooled, tensors.head_weight, tensors.head_bias, seq_slot, seq_labels)
            labels = seq_labels.tolist()
            all_logits = all_logits.cpu().numpy()
            for j in range(sequences):
                logits[order[j]] = all_logits[j, :labels[j]]
        embeddings = None
        if batch.want_embeddings:
            restore = np.empty(len(order), dtype=np.int64)
            restore[order] = np.arange(len(order))
            embeddings = pooled[torch.from_numpy(restore).to(self.device)].cpu().numpy()
        return BatchResult(logits=logits if batch.want_logits else [], embeddings=embeddings)
