"""Text report of a plan for people (`scheinfer plan`, startup logs): bytes per kind per layer,
GPU memory, predicted prefill and decode speed next to the floor from the profile."""

from __future__ import annotations

from engine.model.config import ModelConfig
from engine.placement.cost_model import HostMode, Prediction
from engine.placement.hardware import HardwareProfile
from engine.placement.memory import GpuMemoryBreakdown, bytes_per_row, format_bytes
from engine.placement.plan import PartitionPlan

GIB = 1 << 30
_MODE_TEXT = {HostMode.STATIC: "plan's fixed kinds", HostMode.ASSIGN: "per-step token assignment",
              HostMode.FIDDLER: "Fiddler's per-piece rule, no overlap"}


def bytes_by_kind_per_layer(plan: PartitionPlan, config: ModelConfig, itemsize: int) -> dict[int, tuple[int, int, int]]:
    """layer -> (GG, CG, CC) weight bytes."""
    row_bytes = bytes_per_row(config, itemsize)
    out: dict[int, list[int]] = {layer: [0, 0, 0] for layer in range(config.num_layers)}
    for (layer, _), split in plan.splits.items():
        for i, rows in enumerate((split.gg, split.cg, split.cc)):
            out[layer][i] += rows * row_bytes
    return {layer: (v[0], v[1], v[2]) for layer, v in out.items()}


def layer_table(per_layer: dict[int, tuple[int, int, int]]) -> list[str]:
    """Rows of GiB per kind; runs of layers that print the same share one row."""
    rows: list[tuple[int, int, str]] = []  # (first layer, last layer, cells)
    for layer in sorted(per_layer):
        cells = _cells(per_layer[layer])
        if rows and rows[-1][2] == cells and rows[-1][1] == layer - 1:
            rows[-1] = (rows[-1][0], layer, cells)
        else:
            rows.append((layer, layer, cells))
    totals = tuple(sum(v[k] for v in per_layer.values()) for k in range(3))
    body = [f"  {f'{a}' if a == b else f'{a}-{b}':<10}{cells}" for a, b, cells in rows]
    return [f"  {'layers':<10}{'GG GiB':>9}{'CG GiB':>9}{'CC GiB':>9}", *body, f"  {'all':<10}{_cells(totals)}"]


def _cells(kinds: tuple[int, int, int]) -> str:
    return "".join(f"{b / GIB:9.2f}" for b in kinds)


def _model_text(config: ModelConfig) -> str:
    moe = config.moe
    shape = (f"{moe.num_experts} experts top-{moe.num_experts_per_tok} of {moe.expert_intermediate_size}"
             if moe else f"MLP {config.intermediate_size}")
    return f"{config.name or config.model_type}: {config.num_layers} layers, hidden {config.hidden_size}, {shape}"


def _speed_row(name: str, seconds: float, tokens: int, floor_s: float, note: str = "") -> str:
    row = f"  {name:<16}{tokens / seconds:10.1f} tok/s {1e3 * seconds:9.1f} ms"
    if floor_s <= 0:
        return row + "   floor: none (no host weights)" + note
    return row + f"   floor {tokens / floor_s:10.1f} tok/s   {floor_s / seconds:4.0%} of floor{note}"


def render_plan_report(config: ModelConfig, plan: PartitionPlan, memory: GpuMemoryBreakdown,
                       budget_bytes: int | None, itemsize: int, profile: HardwareProfile, prediction: Prediction,
                       prompt_lens: tuple[int, ...] = (512, 2048)) -> str:
    """The whole report: what lives where, and how fast it should run."""
    budget = format_bytes(budget_bytes) if budget_bytes is not None else "none"
    lines = [f"model {_model_text(config)}; {itemsize} bytes per weight",
             f"policy {plan.policy}" + (f" (per-step rule {plan.dynamic})" if plan.dynamic else "")
             + f"; GPU budget {budget}; host chunks of {plan.host_chunk} rows"
             + (f", stored compact ({plan.host_bytes_ratio:.2f} of their bf16 bytes)" if plan.host_bytes_ratio != 1.0
                else ""),
             "profile: " + profile.describe().replace("\n", "\n         "),
             f"GPU memory: {memory.describe()}",
             "FFN weights per kind (GG resident, CG streamed, CC on the CPU):",
             *layer_table(bytes_by_kind_per_layer(plan, config, itemsize)),
             f"predicted, batch {prediction.batch_size}; host pieces: decode by {_MODE_TEXT[prediction.decode_mode]}, "
             f"prefill by {_MODE_TEXT[prediction.prefill_mode]}:",
             _speed_row("decode", prediction.decode_s_per_token, 1, prediction.floor_decode_s)]
    chunk = prediction.prefill_chunk_tokens
    for n in prompt_lens:
        steps = -(-n // chunk) if chunk else 1
        note = f" ({steps} steps of {chunk})" if steps > 1 else ""
        lines.append(_speed_row(f"prefill-{n}", prediction.prefill_s(n), n, prediction.floor_prefill_s(n), note))
    if prediction.prefill_mode is HostMode.ASSIGN:
        static = ", ".join(f"prefill-{n} {prediction.prefill_tok_s(n, HostMode.STATIC):.1f} tok/s" for n in prompt_lens)
        lines.append(f"  with the plan's fixed kinds in prefill too: {static}")
    lines.append("floors: decode = routed host bytes read by the CPU at DRAM speed while PCIe streams "
                 "(together at most the host DRAM rate measured with both reading); "
                 "prefill = host bytes split between PCIe and the CPU's measured rate")
    return "\n".join(lines)
