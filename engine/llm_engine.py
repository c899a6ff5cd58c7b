"""LLMEngine: the synchronous core. add_request / step / abort; no threads, no I/O.

One step: the scheduler assigns tokens, the model runner computes them, the sampler picks the
next token of every sequence whose tokens are all computed, and finished requests give their KV
blocks back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_config import EngineConfig
from engine.executor.setup import Partition, build_partitioned
from engine.kv_cache.block_manager import BlockManager
from engine.model.attention_kernels import check_attention_kernels
from engine.model.config import ModelConfig
from engine.model.decode_graphs import MAX_GRAPH_TOKENS, DecodeGraphs
from engine.model.factory import load_model, resolve_dtype, resolve_model_config
from engine.model_runner import ModelRunner
from engine.outputs import EngineStats, RequestOutput, StepStats
from engine.sampler import Sampler, SampleResult, SamplerRequest, TokenLogprob, make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (too long, duplicate id, ...); `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _Request:
    seq: Sequence
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[TokenLogprob] | None
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        model_config, checkpoint = resolve_model_config(config.model)
        self.model_config: ModelConfig = model_config
        tokenizer_dir = config.tokenizer or (str(checkpoint) if checkpoint else None)
        self.tokenizer = tokenizer or (Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir else None)
        self.partition: Partition | None = None
        sched = config.scheduler
        on_gpu = torch.device(config.device).type == "cuda"
        graph_tokens = min(MAX_GRAPH_TOKENS, sched.max_num_seqs) if config.decode_graphs and on_gpu else 0
        if config.partition.partitioned:
            dtype = resolve_dtype(config.dtype, model_config, config.random_weights)
            model, self.partition = build_partitioned(
                config.model, model_config, config.device, dtype, config.dtype, config.random_weights, config.seed,
                config.partition, config.kv_cache_tokens, sched.max_num_batched_tokens, sched.max_num_seqs,
                config.show_progress, graph_tokens)
        else:
            model = load_model(config.model, config.device, config.dtype, config.random_weights, config.seed,
                               show_progress=config.show_progress)
        model.attention_kernels = check_attention_kernels(config.attention_kernels)
        if graph_tokens:
            model.decode_graphs = DecodeGraphs(model, graph_tokens)
        num_blocks = max(1, config.kv_cache_tokens // config.block_size)
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * config.block_size)
        self.runner = ModelRunner(model, num_blocks, config.block_size, trace=config.trace)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | (
            self.tokenizer.eos_token_ids if self.tokenizer else frozenset())
        self._requests: dict[str, _Request] = {}
        self._num_preemptions = 0
        self._last_step: StepStats | None = None

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens} ({total} in all)",
                param="max_tokens" if len(prompt_token_ids) < self.max_model_len else "prompt",
            )
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none", param="stop")
        seq = Sequence(request_id, list(prompt_token_ids), params)
        detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop) \
            if self.tokenizer else None
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self._requests[request_id] = _Request(
            seq, make_generator(params.seed, self.runner.model.device), detokenizer,
            [] if params.logprobs is not None else None, stop_token_ids=stop_ids)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finishes the request now (its KV blocks are freed at once); its final output, if it existed."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request.seq, FinishReason.ABORT)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        bm = self.block_manager
        busy: dict[str, float] = {}
        if self.partition is not None:
            executor, ring = self.partition.executor, self.partition.executor.ring
            feedback = executor.feedback
            reading = feedback.readings.get(feedback.shift)
            busy = {"cpu_busy_s": executor.cpu_pool.busy_s, "gpu_busy_s": executor.gpu_busy.collect(),
                    "bytes_streamed": ring.bytes_streamed if ring else 0,
                    "pcie_busy_s": ring.busy.collect() if ring else 0.0,
                    "decode_shift": feedback.shift, "decode_moves": feedback.moves,
                    "decode_imbalance_s": feedback.imbalance_s,
                    "decode_layer_period_s": reading.period_s if reading is not None else 0.0}
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage,
                           bm.num_free_blocks, bm.num_blocks, self._num_preemptions, self._last_step, **busy)

    def plan_info(self) -> dict:
        """The partition in force (GET /v1/engine/plan): policy, GPU memory, bytes per kind per layer."""
        model = self.runner.model
        info: dict = {"model": self.model_config.name, "device": str(model.device), "dtype": str(model.dtype)}
        if self.partition is None:
            return {**info, "policy": "single-device"}
        return {**info, **self.partition.describe()}

    def prompt_logits(self, prompt_token_ids: list[int], max_chunk: int | None = None) -> torch.Tensor:
        """fp32 logits [vocab] after the last prompt token, computed in chunks of `max_chunk` tokens
        (default: one chunk). Uses and frees its own KV blocks; for exactness checks."""
        seq = Sequence("__logits__", list(prompt_token_ids), SamplingParams(max_tokens=1))
        chunk_size = max_chunk or len(prompt_token_ids)
        try:
            while seq.num_uncomputed_tokens > 0:
                num_tokens = min(chunk_size, seq.num_uncomputed_tokens)
                self.block_manager.grow(seq.block_table, seq.num_computed_tokens + num_tokens)
                logits = self.runner.execute([ScheduledChunk(seq, num_tokens)])
                seq.num_computed_tokens += num_tokens
        finally:
            self.block_manager.free(seq.block_table)
        return logits[0]

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start_s = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self._num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return []
        chunks = scheduled.chunks
        try:
            logits = self.runner.execute(chunks)
            sampled_chunks = [c for c in chunks if c.completes_sequence]
            results = self.sampler(logits, [self._sampler_request(c) for c in sampled_chunks])
        except Exception as exc:  # a failing step fails its own requests only
            logger.exception("step failed; failing its %d requests", len(chunks))
            return [self._fail(c.seq.request_id, f"internal error during generation: {exc}") for c in chunks]
        outputs = self._apply(chunks, sampled_chunks, results)
        num_decode = len(scheduled.decodes)
        num_prefill = scheduled.num_tokens - num_decode
        kind = "mixed" if num_decode and num_prefill else ("decode" if num_decode else "prefill")
        self._last_step = StepStats(kind, num_prefill, num_decode, time.perf_counter() - start_s)
        return outputs

    def _sampler_request(self, chunk: ScheduledChunk) -> SamplerRequest:
        request = self._requests[chunk.seq.request_id]
        seq = chunk.seq
        return SamplerRequest(seq.params, seq.prompt_token_ids, seq.output_token_ids, request.generator)

    def _apply(self, chunks: list[ScheduledChunk], sampled: list[ScheduledChunk],
               results: list[SampleResult]) -> list[RequestOutput]:
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        outputs = []
        for chunk, result in zip(sampled, results, strict=True):
            request = self._requests[chunk.seq.request_id]
            reason = self._append_token(request, result)
            if reason is not None:
                self.scheduler.finish(request.seq, reason)
                del self._requests[request.seq.request_id]
            outputs.append(self._output(request))
        return outputs

    def _append_token(self, request: _Request, result: SampleResult) -> FinishReason | None:
        seq, params = request.seq, request.seq.params
        seq.output_token_ids.append(result.token_id)
        if request.logprobs is not None and result.logprob is not None:
            request.logprobs.append(result.logprob)
        if request.detokenizer is not None:
            request.detokenizer.append(result.token_id)
            if request.detokenizer.stopped:
                return FinishReason.STOP
        if result.token_id in request.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        request = self._requests.pop(request_id)
        self.scheduler.finish(request.seq, FinishReason.ERROR)
        output = self._output(request)
        output.error = message
        return output

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        finished = seq.is_finished
        text = ""
        if request.detokenizer is not None:
            if finished and not request.detokenizer.stopped:
                request.detokenizer.flush()  # releases text held back for a stop string that never came
            text = request.detokenizer.text
        new_tokens = seq.output_token_ids[request.num_emitted_tokens :]
        delta_text = text[request.num_emitted_chars :]
        logprobs = request.logprobs
        delta_logprobs = logprobs[request.num_emitted_tokens :] if logprobs is not None else None
        request.num_emitted_tokens = len(seq.output_token_ids)
        request.num_emitted_chars = len(text)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            delta_token_ids=new_tokens,
            delta_text=delta_text,
            logprobs=list(logprobs) if logprobs is not None else None,
            delta_logprobs=delta_logprobs,
            finished=finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
        )
