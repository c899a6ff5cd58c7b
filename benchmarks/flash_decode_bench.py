"""Decode attention's kernel time against the context length (one sequence, one query), as the
engine calls it (engine/model/decode_attention.flash_decode: flash's varlen kernel reading the
layer's cache in place, the split of the keys following the power-of-two bound), beside SDPA's
flash kernel on the exact keys. GPU only.

    PYTHONPATH=. python3 benchmarks/flash_decode_bench.py [--heads 32 --kv-heads 8 --head-dim 128] --out F
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.model.decode_attention import DecodeKeys, flash_decode, key_bucket


def kernel_us(fn, calls: int = 200) -> float:
    """Median over 5 rounds of the mean time per call of `calls` back-to-back calls (CUDA events)."""
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(rounds)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--lengths", default="512,640,2048,2176,8192,32768")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    lengths = [int(n) for n in args.lengths.split(",")]
    slots = max(key_bucket(n) for n in lengths) + 64
    keys = torch.randn(slots, args.kv_heads, args.head_dim, dtype=dtype, device=device)
    values = torch.randn_like(keys)
    q = torch.randn(1, args.heads, args.head_dim, dtype=dtype, device=device)
    scale = args.head_dim ** -0.5
    qs = q.transpose(0, 1)[None]  # [1, heads, 1, dim]
    rows = []
    for n in lengths:
        where = DecodeKeys(key_bucket(n), torch.tensor([0, 1, 16, 16 + n, n], dtype=torch.int32, device=device))
        engine = kernel_us(lambda where=where: flash_decode(q, keys, values, where, scale))
        k = keys[16 : 16 + n].transpose(0, 1)[None]  # [1, kv_heads, n, dim]
        v = values[16 : 16 + n].transpose(0, 1)[None]
        sdpa, same = None, None
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = kernel_us(lambda k=k, v=v: F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True))
                same = torch.equal(flash_decode(q, keys, values, where, scale),
                                   F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)[0].transpose(0, 1))
        except RuntimeError as exc:  # no GQA in this torch's flash SDPA
            print(f"SDPA flash with GQA: {str(exc)[:120]}")
        kv_bytes = 2 * n * args.kv_heads * args.head_dim * 2
        rows.append({"keys": n, "bound": key_bucket(n), "engine_us": engine, "sdpa_flash_us": sdpa,
                     "kv_gb_s": kv_bytes / engine / 1e3, "same_bits": same})
        print(f"keys {n:6d} (bound {key_bucket(n):6d}): engine {engine:7.1f} us ({rows[-1]['kv_gb_s']:6.0f} GB/s of KV), "
              f"SDPA flash {sdpa if sdpa is None else round(sdpa, 1)} us, same bits {same}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args),
                       "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
