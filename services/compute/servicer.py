"""gRPC surface of compute: decode and validate the packed batch, run the pipeline, encode results."""
from __future__ import annotations

import numpy as np

from hmi_proto.v1 import compute_pb2 as pb
from hmi_proto.v1 import compute_pb2_grpc as pb_grpc
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.limits import MAX_TOP_LOGPROBS
from services.common.rpc import handles_errors, handles_stream_errors, remaining_timeout
from services.compute.batch import PackedBatch
from services.compute.generation_scheduler import GenerationRequest, SamplingParams
from services.compute.pipeline import PipelineStats
from services.compute.serving import DecoderServing, EncoderServing, Serving


def _logprob_pb(found) -> pb.SampledLogprob:
    return pb.SampledLogprob(logprob=found.logprob, top_ids=found.top_ids, top_logprobs=found.top_logprobs)


class ComputeServicer(pb_grpc.ComputeServicer):
    """Serves an encoder (Forward: packed batches through its pipeline) or a decoder (Generate: its engine)."""

    def __init__(self, serving: Serving, *, max_batch_tokens: int, model_name: str, default_timeout: float = 30.0):
        self.serving = serving
        self.pool = serving.pool
        self.max_batch_tokens = max_batch_tokens
        self.model_name = model_name
        self.default_timeout = default_timeout

    @handles_errors
    def Forward(self, request, context) -> pb.ForwardResponse:
        if not isinstance(self.serving, EncoderServing):
            raise FailedPrecondition(f"this compute replica serves the decoder {self.model_name!r}: it generates "
                                     f"(Generate), it does not run classification batches")
        pipeline = self.serving.pipeline
        self._check_model(spec.model for spec in request.sequences)
        dims = pipeline.pool.dims
        batch = PackedBatch.from_pb(request, num_layers=dims.layers, vocab=dims.vocab,
                                    max_positions=dims.max_positions, max_tokens=self.max_batch_tokens)
        result, timings = pipeline.run(batch, remaining_timeout(context, self.default_timeout),
                                            wanted=context.is_active)
        response = result.to_pb()
        response.queue_ms, response.fetch_ms, response.execute_ms = (timings.queue_ms, timings.fetch_ms,
                                                                     timings.execute_ms)
        return response

    def _check_model(self, models) -> None:
        wrong = {m for m in models if m and m != self.model_name}
        if wrong:
            raise FailedPrecondition(f"this compute replica serves base model {self.model_name!r}, not "
                                     f"{sorted(wrong)[0]!r}: the gateway's --compute MODEL=ADDRESS mapping is wrong")

    @handles_stream_errors
    def Generate(self, request, context):
        if not isinstance(self.serving, DecoderServing):
            raise FailedPrecondition(f"this compute replica serves the encoder {self.model_name!r}: it does not "
                                     f"generate")
        spec, params = request.sequence, request.params
        self._check_model([spec.model])
        vocab = self.pool.dims.vocab
        prompt = np.asarray(request.prompt_ids, dtype=np.int64)
        if len(prompt) and (prompt.min() < 0 or prompt.max() >= vocab):
            raise InvalidArgument(f"prompt token ids must lie in [0, {vocab})")
        if params.max_new_tokens < 1 or params.temperature < 0 or params.top_k < 0 or not 0 <= params.top_p <= 1:
            raise InvalidArgument("sampling parameters out of range: max_new_tokens >= 1, temperature >= 0, "
                                  "top_k >= 0, top_p in [0, 1]")
        if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}")
        repetition = params.repetition_penalty or 1.0
        if not (abs(params.presence_penalty) <= 2 and abs(params.frequency_penalty) <= 2 and 0 < repetition <= 2):
            raise InvalidArgument("penalties out of range: presence_penalty and frequency_penalty in [-2, 2], "
                                  "repetition_penalty in (0, 2]")
        stream = self.serving.engine.submit(GenerationRequest(
            spec.tenant_id, spec.adapter_version, spec.domain, spec.split_layer, prompt,
            SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                           top_p=params.top_p or 1.0, seed=params.seed,
                           stop_token_ids=tuple(params.stop_token_ids), logprobs=params.logprobs,
                           top_logprobs=params.top_logprobs, prompt_logprobs=params.prompt_logprobs,
                           presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                           repetition_penalty=repetition, output_pattern=params.output_pattern,
                           kv_budget=params.kv_budget),
            weight=spec.weight or 1.0, domain_revision=spec.domain_revision))
        context.add_callback(stream.cancel)   # client gone or deadline passed: free the KV cache
        for token, details in stream.with_details():
            response = pb.GenerateResponse(token_ids=[token])
            if details is not None:
                if details.logprob is not None:
                    response.logprobs.append(_logprob_pb(details.logprob))
                response.prompt_logprobs.extend(_logprob_pb(found) for found in details.prompt_logprobs or ())
            yield response
        yield pb.GenerateResponse(finish_reason=stream.finish_reason or "length")

    @handles_errors
    def Stats(self, request, context) -> pb.StatsResponse:
        pool = self.pool
        serving = self.serving
        stats = serving.pipeline.stats if isinstance(serving, EncoderServing) else PipelineStats()
        generation = {}
        if isinstance(serving, DecoderServing):
            snapshot = serving.engine.snapshot()
            generation = dict(generation_steps=snapshot.steps, generated_tokens=snapshot.tokens_generated,
                              generating=snapshot.running, generation_waiting=snapshot.waiting,
                              kv_bytes_used=snapshot.kv_bytes_used, kv_budget_bytes=snapshot.kv_budget_bytes)
        return pb.StatsResponse(
            batches=stats.batches, sequences=stats.sequences, tokens=stats.tokens,
            adapter_hits_device=pool.stats.device_hits, adapter_hits_host=pool.stats.host_hits,
            adapter_misses=pool.stats.misses, device_slots=pool.num_slots, device_slots_used=pool.used_slots(),
            host_cache_bytes=pool.host_bytes(), device=str(pool.device), model=self.model_name,
            plot_hit_depths=list(stats.hit_depth_counts), io_seconds=stats.io_seconds,
            io_hidden_seconds=stats.io_hidden_seconds, **generation)
