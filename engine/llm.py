"""LLM: the public offline API (like vLLM's `LLM`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.engine_config import EngineConfig
from engine.executor.setup import PartitionOptions
from engine.llm_engine import LLMEngine, RequestError
from engine.outputs import RequestOutput
from engine.placement.plan import PartitionPlan
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig


class LLM:
    """Loads a model once and generates for batches of prompts.

    >>> llm = LLM("path/to/hf_model_dir", device="cuda")
    >>> outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    >>> outs[0].text, outs[0].token_ids
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "auto",
        *,
        random_weights: bool = False,
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_tokens: int = 16384,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_prefill_chunk: int = 512,
        gpu_memory_budget: str | int | None = None,
        policy: str | PartitionPlan = "auto",
        cpu_threads: int | None = None,
        staging_slots: int = 8,
        host_chunk_rows: int = 1024,
        profile_path: str | None = None,
        compact_host_weights: bool | None = None,
        trace: bool = False,
        show_progress: bool = True,
        **engine_options: object,
    ) -> None:
        """`gpu_memory_budget` (e.g. "24GiB") caps what the engine allocates on the GPU; the FFN
        weights that do not fit are partitioned over CPU, PCIe and GPU by `policy` (see
        engine/placement/policies.py, or pass a PartitionPlan). `compact_host_weights`: bf16 host pieces
        are stored compact (lossless, a quarter fewer bytes to read; engine/model/compact_weights.py);
        None: when the CPU kernels decode them in registers (AVX512/AMX), True: whenever they can."""
        scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_prefill_chunk)
        partition = PartitionOptions(policy, gpu_memory_budget, cpu_threads, staging_slots, host_chunk_rows,
                                     profile_path=profile_path, compact_host_weights=compact_host_weights)
        config = EngineConfig(model=model, device=device, dtype=dtype, random_weights=random_weights,
                              seed=seed, max_model_len=max_model_len, block_size=block_size,
                              kv_cache_tokens=kv_cache_tokens, scheduler=scheduler, partition=partition,
                              trace=trace, show_progress=show_progress, **engine_options)  # type: ignore[arg-type]
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs in the order of the prompts."""
        token_lists = self._prompt_token_lists(prompts, prompt_token_ids)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(token_lists)
        else:
            params_list = list(params)
            if len(params_list) != len(token_lists):
                raise ValueError(f"{len(params_list)} SamplingParams for {len(token_lists)} prompts")
        request_ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        for request_id, tokens, p in zip(request_ids, token_lists, params_list, strict=True):
            self.engine.add_request(request_id, tokens, p)
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        for output in finished.values():
            if output.finish_reason == "error":
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
        return [finished[r] for r in request_ids]

    def _prompt_token_lists(
        self, prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None
    ) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        if prompt_token_ids is not None:
            return [list(ids) for ids in prompt_token_ids]
        if self.engine.tokenizer is None:
            raise RequestError("this model has no tokenizer: pass prompt_token_ids instead of text")
        texts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        return [self.engine.tokenizer.encode(t) for t in texts]
