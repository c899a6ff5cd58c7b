"""ScheInfer engine: exact LLM inference over a paged KV cache, partitioned across CPU and GPU."""

import os

# Back large CPU tensors with transparent huge pages: first-touch page faults otherwise dominate
# building tens of GB of weights (2-3x slower measured). Read by torch's CPU allocator.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
