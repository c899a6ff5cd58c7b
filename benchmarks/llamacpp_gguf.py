"""Write a GGUF file of a MoE model with random bf16 weights, for the llama.cpp baseline.

    python benchmarks/llamacpp_gguf.py --model mixtral-8x7b --layers 4 --out /tmp/mixtral_4l.gguf
    python benchmarks/llamacpp_gguf.py --model mixtral-8x7b --layers 2 --tiny --out /tmp/tiny.gguf

Why: llama.cpp reads only GGUF, and the headline workload has no checkpoint (random weights,
DESIGN.md "Measuring speed"). Dimensions come from `configs/models/<model>.json` (the same files
the engine uses); only the number of layers changes (`--layers`), so that llama.cpp can be timed
at two layer counts and scaled to the full model (`llamacpp_bench.py`). `--tiny` shrinks every
dimension for tests on a small machine.

Layout as llama.cpp expects it (arch "llama" with experts for Mixtral, "phimoe" for Phi-3.5-MoE):
`blk.N.ffn_{gate,up,down}_exps` as 3-D bf16 tensors, `blk.N.ffn_gate_inp` and 1-D tensors in f32
(as llama.cpp's converter writes them), separate q/k/v, and a minimal SentencePiece-style
vocabulary (`<unk>`, `<s>`, `</s>`, 256 byte tokens, fillers) so that the model loads.

Random data is fast: one 64 MiB random bf16 block is drawn once and every large tensor is written
as that block repeated from a random offset, straight to the file (no tensor is held in memory).
gguf-py is imported from the llama.cpp source tarball (`--gguf-py`, or extracted from
`.cache/llamacpp/llama.cpp-src.tar.gz`), not from pip, so it matches the llama.cpp build.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARBALL = REPO_ROOT / ".cache" / "llamacpp" / "llama.cpp-src.tar.gz"
DEFAULT_GGUF_PY_DIR = Path("/tmp/llamacpp-gguf-py")
BLOCK_ELEMENTS = 32 * 1024 * 1024  # 64 MiB of bf16
WEIGHT_STD = 0.02
FILE_TYPE_MOSTLY_BF16 = 32
NUM_BYTE_TOKENS = 256


@dataclass(frozen=True)
class MoeShape:
    """What the GGUF needs to know about the model (from its HF config)."""

    arch: str  # llama.cpp architecture name
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    eos_token_id: int
    has_biases: bool  # phimoe: layer-norm, attention and lm-head biases

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def load_shape(model: str, num_layers: int | None = None, tiny: bool = False) -> MoeShape:
    cfg = json.loads((REPO_ROOT / "configs" / "models" / f"{model}.json").read_text())
    arch = {"mixtral": "llama", "phimoe": "phimoe"}.get(cfg["model_type"])
    if arch is None:
        raise SystemExit(f"{model}: model_type {cfg['model_type']} not supported (mixtral, phimoe)")
    shape = MoeShape(
        arch=arch, name=model, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_experts=cfg["num_local_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
        context_length=cfg["max_position_embeddings"], rope_theta=float(cfg["rope_theta"]),
        norm_eps=float(cfg["rms_norm_eps"]), eos_token_id=int(cfg["eos_token_id"]),
        has_biases=arch == "phimoe",
    )
    if tiny:
        shape = replace(shape, name=f"{model}-tiny", hidden_size=256, intermediate_size=512, num_heads=8,
                        num_kv_heads=2, vocab_size=512, context_length=4096, eos_token_id=2)
    if num_layers is not None:
        shape = replace(shape, num_layers=num_layers)
    return shape


def tensor_plan(s: MoeShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) in file order; kind: bf16 (random), f32 (random), ones, zeros."""
    h, f, e = s.hidden_size, s.intermediate_size, s.num_experts
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (s.vocab_size, h), "bf16")]
    for i in range(s.num_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (h,), "ones")]
        plan += [(b + "attn_norm.bias", (h,), "zeros")] if s.has_biases else []
        plan += [(b + "attn_q.weight", (q, h), "bf16"), (b + "attn_k.weight", (kv, h), "bf16"),
                 (b + "attn_v.weight", (kv, h), "bf16")]
        if s.has_biases:
            plan += [(b + "attn_q.bias", (q,), "zeros"), (b + "attn_k.bias", (kv,), "zeros"),
                     (b + "attn_v.bias", (kv,), "zeros")]
        plan += [(b + "attn_output.weight", (h, q), "bf16")]
        plan += [(b + "attn_output.bias", (h,), "zeros")] if s.has_biases else []
        plan += [(b + "ffn_norm.weight", (h,), "ones")]
        plan += [(b + "ffn_norm.bias", (h,), "zeros")] if s.has_biases else []
        plan += [(b + "ffn_gate_inp.weight", (e, h), "f32"),
                 (b + "ffn_gate_exps.weight", (e, f, h), "bf16"),
                 (b + "ffn_down_exps.weight", (e, h, f), "bf16"),
                 (b + "ffn_up_exps.weight", (e, f, h), "bf16")]
    plan += [("output_norm.weight", (h,), "ones")]
    plan += [("output_norm.bias", (h,), "zeros")] if s.has_biases else []
    plan += [("output.weight", (s.vocab_size, h), "bf16")]
    plan += [("output.bias", (s.vocab_size,), "zeros")] if s.has_biases else []
    return plan


class RepeatedBlock:
    """Stands in for a bf16 ndarray in GGUFWriter.write_tensor_data: writes `num_elements` values
    taken from `block` (uint16 bf16 bits) cyclically from `offset`, in chunks."""

    def __init__(self, block: np.ndarray, num_elements: int, offset: int):
        self.block, self.num_elements, self.offset = block, num_elements, offset % block.size
        self.nbytes = num_elements * block.itemsize

    def tofile(self, fp) -> None:
        left, pos = self.num_elements, self.offset
        while left > 0:
            n = min(left, self.block.size - pos)
            self.block[pos:pos + n].tofile(fp)
            left -= n
            pos = 0


def random_bf16_block(rng: np.random.Generator, num_elements: int) -> np.ndarray:
    """Normal(0, WEIGHT_STD) rounded to bf16 (round to nearest even), as uint16 bits."""
    x = (rng.standard_normal(num_elements, dtype=np.float32) * WEIGHT_STD).view(np.uint32)
    x += 0x7FFF + ((x >> 16) & 1)
    return (x >> 16).astype(np.uint16)


def import_gguf(gguf_py_dir: Path | None = None, tarball: Path = DEFAULT_TARBALL):
    """gguf-py of the carried llama.cpp sources (extracted from the tarball if needed)."""
    if gguf_py_dir is None:
        gguf_py_dir = DEFAULT_GGUF_PY_DIR / "llama.cpp" / "gguf-py"
        if not (gguf_py_dir / "gguf" / "__init__.py").exists():
            if not tarball.exists():
                raise SystemExit(f"no gguf-py: pass --gguf-py DIR or provide {tarball}")
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("llama.cpp/gguf-py/")]
                tar.extractall(DEFAULT_GGUF_PY_DIR, members=members, filter="data")
    sys.path.insert(0, str(gguf_py_dir))
    import gguf

    return gguf


def vocabulary(s: MoeShape) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, <0x00>..<0xFF>, then filler pieces; scores and token types (gguf TokenType)."""
    normal, unknown, control, byte = 1, 2, 3, 6
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(NUM_BYTE_TOKENS)]
    types = [unknown, control, control] + [byte] * NUM_BYTE_TOKENS
    num_fill = s.vocab_size - len(tokens)
    if num_fill < 0:
        raise SystemExit(f"vocab_size {s.vocab_size} < {len(tokens)}")
    tokens += [f"\u2581t{i}" for i in range(num_fill)]
    types += [normal] * num_fill
    if s.eos_token_id >= len(tokens) - num_fill:
        types[s.eos_token_id] = control
    if s.arch == "phimoe":  # llama.cpp looks "<|endoftext|>" up by text for models named phi-3*
        eot = s.eos_token_id if s.eos_token_id >= len(tokens) - num_fill else len(tokens) - 1
        tokens[eot], types[eot] = "<|endoftext|>", control
    scores = [0.0] * (len(tokens) - num_fill) + [-float(i) for i in range(num_fill)]
    return tokens, scores, types


def write_gguf(path: Path, s: MoeShape, seed: int = 0, gguf_py_dir: Path | None = None) -> dict:
    """Write the file; return sizes and timings."""
    gguf = import_gguf(gguf_py_dir)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    plan = tensor_plan(s)
    block = random_bf16_block(rng, min(BLOCK_ELEMENTS, max(int(np.prod(t[1])) for t in plan if t[2] == "bf16")))
    random_s = time.perf_counter() - start
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"{s.name}-random-{s.num_layers}l")
    w.add_file_type(FILE_TYPE_MOSTLY_BF16)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.num_layers)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_head_count(s.num_heads)
    w.add_head_count_kv(s.num_kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_expert_count(s.num_experts)
    w.add_expert_used_count(s.num_experts_per_tok)
    w.add_vocab_size(s.vocab_size)
    tokens, scores, types = vocabulary(s)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(s.eos_token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    bf16 = gguf.GGMLQuantizationType.BF16
    for name, shape, kind in plan:
        n = int(np.prod(shape))
        if kind == "bf16":
            w.add_tensor_info(name, shape, np.dtype(np.uint16), n * 2, raw_dtype=bf16)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    num_bytes = 0
    for _name, shape, kind in plan:
        n = int(np.prod(shape))
        if kind == "bf16":
            data = RepeatedBlock(block, n, int(rng.integers(block.size)))
        elif kind == "f32":
            data = rng.standard_normal(n, dtype=np.float32).reshape(shape)
        else:
            data = (np.ones if kind == "ones" else np.zeros)(shape, dtype=np.float32)
        w.write_tensor_data(data)
        num_bytes += data.nbytes
    w.close()
    elapsed_s = time.perf_counter() - start
    return {"path": str(path), "arch": s.arch, "model": s.name, "num_layers": s.num_layers,
            "num_tensors": len(plan), "tensor_bytes": num_bytes, "file_bytes": path.stat().st_size,
            "random_block_s": random_s, "write_s": elapsed_s, "write_gb_per_s": path.stat().st_size / elapsed_s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="configs/models/<model>.json (mixtral-8x7b, phi-3.5-moe)")
    ap.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the model's)")
    ap.add_argument("--tiny", action="store_true", help="small dimensions, for local tests")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf-py", type=Path, default=None, help="llama.cpp's gguf-py directory")
    args = ap.parse_args()
    shape = load_shape(args.model, args.layers, args.tiny)
    stats = write_gguf(args.out, shape, args.seed, args.gguf_py)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
