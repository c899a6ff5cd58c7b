"""ScheInfer engine: exact LLM inference over a paged KV cache, partitioned across CPU and GPU."""

from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
