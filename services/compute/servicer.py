"""gRPC surface of compute: decode and validate the packed batch, run the pipeline, encode results."""
from __future__ import annotations

from hmi.v1 import compute_pb2 as pb
from hmi.v1 import compute_pb2_grpc as pb_grpc
from services.common.rpc import handles_errors, remaining_timeout
from services.compute.batch import PackedBatch
from services.compute.pipeline import Pipeline


class ComputeServicer(pb_grpc.ComputeServicer):
    def __init__(self, pipeline: Pipeline, *, max_batch_tokens: int, model_name: str, default_timeout: float = 30.0):
        self.pipeline = pipeline
        self.max_batch_tokens = max_batch_tokens
        self.model_name = model_name
        self.default_timeout = default_timeout

    @handles_errors
    def Forward(self, request, context) -> pb.ForwardResponse:
        dims = self.pipeline.pool.dims
        batch = PackedBatch.from_pb(request, num_layers=dims.layers, vocab=dims.vocab,
                                    max_positions=dims.max_positions, max_tokens=self.max_batch_tokens)
        result, timings = self.pipeline.run(batch, remaining_timeout(context, self.default_timeout))
        response = result.to_pb()
        response.queue_ms, response.fetch_ms, response.execute_ms = (timings.queue_ms, timings.fetch_ms,
                                                                     timings.execute_ms)
        return response

    @handles_errors
    def Stats(self, request, context) -> pb.StatsResponse:
        pool, stats = self.pipeline.pool, self.pipeline.stats
        return pb.StatsResponse(
            batches=stats.batches, sequences=stats.sequences, tokens=stats.tokens,
            adapter_hits_device=pool.stats.device_hits, adapter_hits_host=pool.stats.host_hits,
            adapter_misses=pool.stats.misses, device_slots=pool.num_slots, device_slots_used=pool.used_slots(),
            host_cache_bytes=pool.host_bytes(), device=str(pool.device), model=self.model_name,
            plot_hit_depths=list(stats.hit_depth_counts), io_seconds=stats.io_seconds,
            io_hidden_seconds=stats.io_hidden_seconds)
