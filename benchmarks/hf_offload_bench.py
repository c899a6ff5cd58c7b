"""Hugging Face device_map offloading baseline (issue 4): prefill and decode speed of `transformers`
with `accelerate` offloading under a GPU memory budget, on a full-size architecture with random
weights built in memory.

    python benchmarks/hf_offload_bench.py --model mixtral-8x7b --budget 24GiB --layers 4 \\
        --prompt-len 512,2048 --new-tokens 16 --out results.json

What it measures. The architecture comes from `configs/models/<model>.json` (HF `config.json`
contents). The budget applies to the full model (`num_hidden_layers` of the config, 32 for Mixtral):
embeddings, final norm and lm_head stay on the GPU, `--reserve` (2 GiB) is kept for activations and
the KV cache, and as many whole decoder layers as fit the rest go on the GPU, the first ones, as
accelerate's `infer_auto_device_map` would place them. The others are mapped to "cpu": accelerate's
`dispatch_model` keeps their weights in CPU memory and copies them to the GPU on every forward
(HF's standard offloading). Building 32 full-size layers would take ~100 GB of host memory and
minutes of random filling, so only `--layers` L decoder layers are built and timed, with the same
fraction of them on the GPU; times are scaled to the full model linearly in layers:
time_full = time_timed * full_layers / L. This over-counts the non-layer parts (embedding lookup,
final norm, the one-row lm_head), which are small next to a layer.

Per prompt length: prefill is one forward over the prompt (random token ids) with `use_cache=True`;
decode is `--new-tokens` greedy single-token forwards reusing the returned `past_key_values`, timed
as the median step after the first. `--device cpu` runs everything on the CPU with no offloading
(for the CPU test); `--config-overrides` shrinks the architecture.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from engine.placement.memory import format_bytes, parse_bytes

MODEL_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
INIT_STD = 0.02
BANK_NUM_VALUES = 1 << 24  # tensors larger than this are tiled from one bank of normal samples
SCALING_NOTE = ("times scaled to the full model linearly in layers (time_full = time_timed * full_layers / "
                "layers_timed); this over-counts the non-layer parts (embeddings, final norm, lm_head), "
                "which are small")


def log(message: str) -> None:
    print(f"[hf_offload] {message}", flush=True)


# --- budget arithmetic (pure) ---------------------------------------------------------------------

def gpu_layers(full_layers: int, layer_bytes: int, nonlayer_bytes: int, budget: int, reserve: int) -> int:
    """Whole decoder layers of the full model that fit on the GPU next to the non-layer weights
    and the reserve: floor((budget - nonlayer - reserve) / layer_bytes), clamped to [0, full_layers]."""
    if layer_bytes <= 0:
        raise ValueError("layer_bytes must be positive")
    free = budget - nonlayer_bytes - reserve
    if free <= 0:
        return 0
    return max(0, min(full_layers, free // layer_bytes))


def scaled_gpu_layers(n_gpu_full: int, full_layers: int, timed_layers: int) -> int:
    """GPU layers of the timed model keeping the full model's fraction, rounded half up."""
    if not 0 <= n_gpu_full <= full_layers or full_layers <= 0:
        raise ValueError(f"need 0 <= n_gpu_full <= full_layers, got {n_gpu_full}, {full_layers}")
    return min(timed_layers, (2 * n_gpu_full * timed_layers + full_layers) // (2 * full_layers))


def scale_to_full(seconds_timed: float, timed_layers: int, full_layers: int) -> float:
    return seconds_timed * full_layers / timed_layers


def parse_prompt_lens(value: str) -> list[int]:
    lens = [int(part) for part in value.split(",") if part.strip()]
    if not lens or min(lens) <= 0:
        raise ValueError(f"prompt lengths must be positive integers, got {value!r}")
    return lens


# --- model -----------------------------------------------------------------------------------------

def load_hf_config(model: str, layers: int, overrides: dict | None = None):
    """HF config for `model` (a name under configs/models or a JSON path) with `layers` decoder
    layers; also returns the full model's layer count (after overrides)."""
    from transformers import AutoConfig

    path = Path(model) if model.endswith(".json") else MODEL_CONFIGS_DIR / f"{model}.json"
    raw = json.loads(path.read_text())
    raw.update(overrides or {})
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    full_layers = int(config.num_hidden_layers)
    if not 1 <= layers <= full_layers:
        raise ValueError(f"--layers must be in [1, {full_layers}], got {layers}")
    config.num_hidden_layers = layers
    return config, full_layers


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once; works on meta)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(non-layer bytes, bytes of one decoder layer) of a CausalLM."""
    layer_bytes = tensor_bytes(model.model.layers[0])
    all_layers = sum(tensor_bytes(layer) for layer in model.model.layers)
    return tensor_bytes(model) - all_layers, layer_bytes


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _fill_normal_(tensor: torch.Tensor, generator: torch.Generator, banks: dict[torch.dtype, torch.Tensor]) -> None:
    """N(0, 0.02) samples. torch's CPU normal_ is single-threaded (~0.1 G values/s), minutes for a
    few full-size layers, so tensors longer than the bank are tiled from one bank of normal samples
    (drawn once per dtype with the same generator) from a random offset: memory-speed copies."""
    if tensor.numel() <= BANK_NUM_VALUES or not tensor.is_contiguous():
        tensor.normal_(0.0, INIT_STD, generator=generator)
        return
    if tensor.dtype not in banks:
        banks[tensor.dtype] = torch.empty(BANK_NUM_VALUES, dtype=tensor.dtype).normal_(
            0.0, INIT_STD, generator=generator)
    bank, flat = banks[tensor.dtype], tensor.view(-1)
    offset = int(torch.randint(BANK_NUM_VALUES, (1,), generator=generator))
    pos = 0
    while pos < flat.numel():
        count = min(flat.numel() - pos, BANK_NUM_VALUES - offset)
        flat[pos : pos + count].copy_(bank[offset : offset + count])
        pos, offset = pos + count, 0


def _reinit_rotary(model: nn.Module) -> int:
    """Rotary modules hold non-persistent buffers (inv_freq) computed at construction: after
    to_empty they are garbage. Replace each by a fresh one built on the CPU from its config."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if "inv_freq" not in dict(module.named_buffers(recurse=False)):
            continue
        fresh = type(module)(config=module.config)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, fresh)
        replaced += 1
    return replaced


def fill_random_(model: nn.Module, seed: int) -> None:
    """Norm weights 1 (biases 0), every other floating-point parameter and buffer N(0, 0.02);
    rotary modules rebuilt."""
    generator = torch.Generator().manual_seed(seed)
    banks: dict[torch.dtype, torch.Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            norm = _is_norm(module)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if norm:
                    tensor.fill_(1.0 if name == "weight" else 0.0)
                else:
                    _fill_normal_(tensor, generator, banks)
    _reinit_rotary(model)


def build_random_model(config, seed: int = 0) -> nn.Module:
    """CausalLM for `config` in bfloat16 on the CPU with random weights (built on meta first)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    fill_random_(model, seed)
    return model.eval()


def device_map_for(model: nn.Module, n_gpu_layers: int, gpu: int | str = 0) -> dict[str, int | str]:
    """Every non-layer module on the GPU, the first `n_gpu_layers` decoder layers on the GPU and
    the rest on "cpu" (offloaded by accelerate, executed on the GPU)."""
    device_map: dict[str, int | str] = {}
    for name, _ in model.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = gpu
    for name, _ in model.named_children():
        if name != "model":
            device_map[name] = gpu
    for i in range(len(model.model.layers)):
        device_map[f"model.layers.{i}"] = gpu if i < n_gpu_layers else "cpu"
    return device_map


def describe_device_map(device_map: dict[str, int | str]) -> str:
    layers = [d for name, d in device_map.items() if name.startswith("model.layers.")]
    others = [name.removeprefix("model.") for name in device_map if not name.startswith("model.layers.")]
    on_gpu = sum(d != "cpu" for d in layers)
    parts = [f"{'/'.join(others)} -> GPU 0"]
    if on_gpu:
        parts.append(f"layers 0-{on_gpu - 1} -> GPU 0 (resident)")
    if on_gpu < len(layers):
        parts.append(f"layers {on_gpu}-{len(layers) - 1} -> cpu (offloaded: copied to GPU 0 on every forward)")
    return "; ".join(parts)


# --- timing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptResult:
    prefill_s_timed: float
    decode_s_timed: float
    prefill_tok_s: float
    decode_tok_s: float


@dataclass
class BenchResult:
    date: str
    model: str
    budget: str
    reserve: str
    layers_timed: int
    full_layers: int
    gpu_layers_full: int
    gpu_layers_timed: int
    layer_bytes: int
    nonlayer_bytes: int
    device: str
    transformers: str
    accelerate: str | None
    torch: str
    new_tokens: int
    note: str = SCALING_NOTE
    by_prompt: dict[str, PromptResult] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _check_finite(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"non-finite logits in {what}: the random weights are broken")


@torch.inference_mode()
def time_prompt(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token after the first step)."""
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    _check_finite(out.logits, "prefill")
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - start)
    _check_finite(out.logits, "decode")
    return prefill_s, statistics.median(steps[1:] or steps)


def run(args: argparse.Namespace) -> BenchResult:
    overrides = json.loads(args.config_overrides) if args.config_overrides else None
    config, full_layers = load_hf_config(args.model, args.layers, overrides)
    budget, reserve = parse_bytes(args.budget), parse_bytes(args.reserve)
    prompt_lens = parse_prompt_lens(args.prompt_len)
    if args.new_tokens < 1:
        raise ValueError("--new-tokens must be at least 1")

    log(f"building {args.model} with {args.layers} of {full_layers} layers (random bf16 weights, seed {args.seed})")
    start = time.perf_counter()
    model = build_random_model(config, args.seed)
    log(f"built in {time.perf_counter() - start:.1f} s")

    nonlayer_bytes, layer_bytes = model_bytes(model)
    n_gpu_full = gpu_layers(full_layers, layer_bytes, nonlayer_bytes, budget, reserve)
    n_gpu_timed = scaled_gpu_layers(n_gpu_full, full_layers, args.layers)
    log(f"full model: non-layer {format_bytes(nonlayer_bytes)} + {full_layers} x {format_bytes(layer_bytes)} "
        f"= {format_bytes(nonlayer_bytes + full_layers * layer_bytes)}; budget {format_bytes(budget)} "
        f"- reserve {format_bytes(reserve)} -> {n_gpu_full}/{full_layers} layers on GPU; "
        f"timed: {n_gpu_timed}/{args.layers}")
    device_map = device_map_for(model, n_gpu_timed)

    if args.device == "cuda":
        from accelerate import dispatch_model

        log(f"device map: {describe_device_map(device_map)}")
        model = dispatch_model(model, device_map=device_map, main_device=0)
        input_device = "cuda:0"
        device_name = torch.cuda.get_device_name(0)
    else:
        log(f"device map (not applied on cpu): {describe_device_map(device_map)}")
        input_device = "cpu"
        device_name = platform.processor() or platform.machine()

    generator = torch.Generator().manual_seed(args.seed + 1)
    vocab = config.vocab_size
    log("warm-up")
    with torch.inference_mode():
        warm = torch.randint(vocab, (1, 8), generator=generator).to(input_device)
        _check_finite(model(input_ids=warm, use_cache=False).logits, "warm-up")
    _sync(args.device)

    result = BenchResult(
        date=time.strftime("%Y-%m-%d"), model=args.model, budget=args.budget, reserve=args.reserve,
        layers_timed=args.layers, full_layers=full_layers, gpu_layers_full=n_gpu_full,
        gpu_layers_timed=n_gpu_timed, layer_bytes=layer_bytes, nonlayer_bytes=nonlayer_bytes,
        device=device_name, transformers=_package_version("transformers") or "?",
        accelerate=_package_version("accelerate"), torch=torch.__version__, new_tokens=args.new_tokens)
    for prompt_len in prompt_lens:
        prompt = torch.randint(vocab, (1, prompt_len), generator=generator).to(input_device)
        log(f"prompt {prompt_len}: prefill + {args.new_tokens} decode steps")
        prefill_s, decode_s = time_prompt(model, prompt, args.new_tokens, args.device)
        prefill_full = scale_to_full(prefill_s, args.layers, full_layers)
        decode_full = scale_to_full(decode_s, args.layers, full_layers)
        result.by_prompt[str(prompt_len)] = PromptResult(
            prefill_s_timed=prefill_s, decode_s_timed=decode_s,
            prefill_tok_s=prompt_len / prefill_full, decode_tok_s=1.0 / decode_full)
        log(f"prompt {prompt_len}: prefill {prefill_s:.3f} s, decode {decode_s * 1e3:.1f} ms/token "
            f"({args.layers} layers)")
    return result


def print_table(result: BenchResult) -> None:
    print(f"\nHF device_map offloading, {result.model}, budget {result.budget} "
          f"({result.gpu_layers_full}/{result.full_layers} layers on GPU; timed "
          f"{result.gpu_layers_timed}/{result.layers_timed}), {result.device}")
    print(f"{'prompt':>7} {'prefill s (timed)':>18} {'decode ms/tok (timed)':>22} "
          f"{'prefill tok/s (full)':>21} {'decode tok/s (full)':>20}")
    for prompt_len, r in result.by_prompt.items():
        print(f"{prompt_len:>7} {r.prefill_s_timed:>18.3f} {r.decode_s_timed * 1e3:>22.1f} "
              f"{r.prefill_tok_s:>21.1f} {r.decode_tok_s:>20.2f}")
    print(f"({result.note})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixtral-8x7b", help="name under configs/models, or a config JSON path")
    parser.add_argument("--budget", default="24GiB", help="GPU memory budget of the full model")
    parser.add_argument("--reserve", default="2GiB", help="part of the budget kept for activations and KV")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers built and timed")
    parser.add_argument("--prompt-len", default="512", help="prompt length, or a comma list: 512,2048")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config-overrides", default=None, help="JSON merged into the config, e.g. to shrink it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> BenchResult:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU (use --device cpu to run on the CPU)")
    result = run(args)
    print_table(result)
    if args.out:
        Path(args.out).write_text(result.to_json() + "\n")
        log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
