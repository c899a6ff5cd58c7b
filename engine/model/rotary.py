"""Rotary position embeddings with the scaling types of the supported configs.

cos/sin are computed once per forward for the step's positions and shared by every layer. Given the
step's largest position (known on the host), they are gathered from tables of every position up to
a power of two, made on first use with the same operations (so the same bits): one gather each
instead of about ten small kernels a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.model.config import RopeConfig, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
MIN_TABLE_POSITIONS = 1024  # a table covers at least this many positions, then the next power of two


def table_rows(max_position: int, max_position_embeddings: int) -> int:
    """Rows of a table that holds `max_position`: a power of two (at least MIN_TABLE_POSITIONS), not
    past the model's context unless a position is (the engine's never are); past it, whole
    MIN_TABLE_POSITIONS (not a rebuild every step)."""
    rows = min(max(MIN_TABLE_POSITIONS, 1 << max_position.bit_length()), max_position_embeddings)
    return rows if max_position < rows else -(-(max_position + 1) // MIN_TABLE_POSITIONS) * MIN_TABLE_POSITIONS


def table_bytes(rope: RopeConfig, head_dim: int, itemsize: int, max_positions: int,
                max_position_embeddings: int) -> int:
    """The most the tables take for sequences of up to `max_positions` tokens: cos and sin (for
    longrope past its original context, a pair for each factor set), and while a table grows, its
    old pair beside the new one (half its rows among powers of two; past the model's context, or
    where the context caps a power of two, nearly all of them)."""
    if max_positions <= 0:
        return 0
    rows = table_rows(max_positions - 1, max_position_embeddings)
    power_of_two = rows & (rows - 1) == 0 and rows <= max_position_embeddings
    old_rows = rows // 2 if power_of_two else rows
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    long = rope.rope_type == "longrope" and max_positions > original
    return (2 if long else 1) * 2 * (rows + old_rows) * head_dim * itemsize


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    factor = rope.get("factor")
    low, high = rope.get("low_freq_factor"), rope.get("high_freq_factor")
    old_len = rope.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass
class RotaryEmbedding:
    """Holds inv_freq (and for longrope, the long variant); produces cos/sin for positions."""

    rope: RopeConfig
    head_dim: int
    max_position_embeddings: int

    def __post_init__(self) -> None:
        rope, dim = self.rope, self.head_dim
        if rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope type {rope.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        self.scaling = 1.0
        self.long_inv_freq: torch.Tensor | None = None
        self.long_scaling = 1.0
        if rope.rope_type == "default":
            self.inv_freq = _base_inv_freq(rope.theta, dim)
        elif rope.rope_type == "linear":
            self.inv_freq = _base_inv_freq(rope.theta, dim) / rope.get("factor")
        elif rope.rope_type == "llama3":
            self.inv_freq = _llama3_inv_freq(rope, dim)
        else:
            self._init_longrope()
        # (device, dtype, long) -> (cos, sin) of positions [0, len): [len, head_dim] each
        self._tables: dict[tuple[torch.device, torch.dtype, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def _init_longrope(self) -> None:
        rope, dim = self.rope, self.head_dim
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        base = rope.theta**shape
        self.inv_freq = 1.0 / (torch.tensor(rope.get("short_factor"), dtype=torch.float32) * base)
        self.long_inv_freq = 1.0 / (torch.tensor(rope.get("long_factor"), dtype=torch.float32) * base)
        self.original_max = int(rope.get("original_max_position_embeddings"))
        if rope.get("short_mscale") is not None:  # PhiMoE gives both scales explicitly
            self.scaling = float(rope.get("short_mscale"))
            self.long_scaling = float(rope.get("long_mscale"))
        else:  # Phi-3 style: derived from the context extension factor
            factor = rope.get("factor") or self.max_position_embeddings / self.original_max
            attention = rope.get("attention_factor")
            if attention is None:
                attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
            self.scaling = self.long_scaling = float(attention)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, long_mask: torch.Tensor | None = None,
        max_position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, head_dim] in `dtype`.

        `long_mask` ([num_tokens] bool) marks tokens of sequences longer than longrope's original
        context: those use the long factors and scale. `max_position`: the largest of `positions`
        (from the host): then cos/sin are gathered from tables (the same bits) instead of computed.
        """
        cos, sin = self._values(positions, dtype, False, max_position)
        # with a table the mask's host flags said some token is long; computed, ask the mask (a sync)
        if self.long_inv_freq is not None and long_mask is not None and (max_position is not None or bool(long_mask.any())):
            long_cos, long_sin = self._values(positions, dtype, True, max_position)
            cos = torch.where(long_mask[:, None], long_cos, cos)
            sin = torch.where(long_mask[:, None], long_sin, sin)
        return cos, sin

    def _values(self, positions: torch.Tensor, dtype: torch.dtype, long: bool,
                max_position: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the short (or long) factors in `dtype`: from the tables given `max_position`,
        else computed (cast before cos_sin's selection: the same bits as after it)."""
        if max_position is not None:
            return self._gather(positions, dtype, long, max_position)
        cos, sin = self._cos_sin(positions, *self._frequencies(long))
        return cos.to(dtype), sin.to(dtype)

    def _frequencies(self, long: bool) -> tuple[torch.Tensor, float]:
        """inv_freq and the scale of the short (or longrope's long) factors."""
        return (self.long_inv_freq, self.long_scaling) if long else (self.inv_freq, self.scaling)

    def _gather(self, positions: torch.Tensor, dtype: torch.dtype, long: bool,
                max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions.device, dtype, long)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] <= max_position:
            rows = table_rows(max_position, self.max_position_embeddings)
            table = self._tables[key] = self._table(rows, positions, dtype, long)
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    def _table(self, rows: int, like: torch.Tensor, dtype: torch.dtype,
               long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions [0, rows) in `dtype`, built MIN_TABLE_POSITIONS rows at a time (the
        fp32 temporaries stay small: the table may grow while serving, under the GPU budget)."""
        inv_freq, scaling = self._frequencies(long)
        cos = torch.empty((rows, self.head_dim), dtype=dtype, device=like.device)
        sin = torch.empty_like(cos)
        for start in range(0, rows, MIN_TABLE_POSITIONS):
            end = min(start + MIN_TABLE_POSITIONS, rows)
            part_cos, part_sin = self._cos_sin(torch.arange(start, end, dtype=like.dtype, device=like.device),
                                               inv_freq, scaling)
            cos[start:end] = part_cos
            sin[start:end] = part_sin
        return cos, sin

    @staticmethod
    def _cos_sin(
        positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
