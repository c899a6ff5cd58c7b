"""Time to build full-size random weights in memory, against transformers' own initialisation.

    python benchmarks/random_weights_build.py --model mixtral-8x7b --baseline llama-2-7b --baseline-layers 4

ScheInfer: build_model + fill_random for the whole model (what `LLM(name, random_weights=True)` does).
Baseline: `AutoModelForCausalLM.from_config` (transformers' init) on `--baseline-layers` layers of the
baseline model, scaled linearly to its full parameter count.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates: huge pages, fewer page faults

import argparse
import json
import platform
import time

import torch

from engine.model.factory import MODEL_CONFIGS_DIR, resolve_model_config
from engine.model.random_weights import fill_random
from engine.model.weights import build_model, device_allocator


def time_scheinfer(name: str, device: str) -> dict:
    config, _ = resolve_model_config(name)
    start = time.perf_counter()
    model, fills = build_model(config, device_allocator(device, torch.bfloat16))
    fill_random(fills, seed=0, show_progress=False)
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - start
    num_bytes = sum(f.out.nbytes for f in fills)
    checksum = float(fills[len(fills) // 2].out.float().sum())
    del model, fills
    return {"model": name, "bytes": num_bytes, "seconds": elapsed_s, "gb_per_s": num_bytes / elapsed_s / 1e9,
            "checksum_mid_tensor": checksum}


def time_transformers(name: str, num_layers: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = resolve_model_config(name)[0]
    full_layers = config_path.num_layers
    raw = json.loads((MODEL_CONFIGS_DIR / f"{name}.json").read_text())
    hf_config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    hf_config.num_hidden_layers = num_layers
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    elapsed_s = time.perf_counter() - start
    num_params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    full_params = num_params + per_layer * (full_layers - num_layers)
    return {"model": name, "layers_timed": num_layers, "seconds_timed": elapsed_s,
            "params_timed": num_params, "params_full": full_params,
            "seconds_scaled_to_full": elapsed_s * full_params / num_params}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default="llama-2-7b")
    parser.add_argument("--baseline-layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "num_cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "scheinfer": time_scheinfer(args.model, args.device),
              "transformers": time_transformers(args.baseline, args.baseline_layers)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    s, t = result["scheinfer"], result["transformers"]
    print(f"\nScheInfer {s['model']}: {s['bytes'] / 1e9:.1f} GB in {s['seconds']:.1f} s ({s['gb_per_s']:.1f} GB/s)")
    print(f"transformers init {t['model']}: {t['params_full'] / 1e9:.2f} B params in "
          f"~{t['seconds_scaled_to_full']:.0f} s (timed {t['layers_timed']} layers: {t['seconds_timed']:.1f} s)")


if __name__ == "__main__":
    main()
