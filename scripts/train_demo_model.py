"""Train ScheInfer's embedded demo model: a small MixtralForCausalLM on text already on the machine.

The text is CPython's own English documentation as installed with Python: the documentation topics
(`pydoc_data.topics`) and the docstrings of the standard-library modules (PSF licence), so nothing
is downloaded. The tokenizer is a byte-level BPE
trained with `tokenizers` on the same text; the model is transformers' own MixtralForCausalLM,
trained with plain PyTorch (AdamW, warmup + cosine learning rate over the time budget), and the
checkpoint with the best validation loss is saved with save_pretrained (bfloat16) next to the
tokenizer files.

    python scripts/train_demo_model.py                      # CPU, 20 minutes, into engine/demo_model
    python scripts/train_demo_model.py --device cuda --minutes 3

Runs are seeded (data order, initialisation); with `--steps` the schedule is fixed by step count
rather than by wall time, which makes a run repeatable step for step on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine.tools.tiny_checkpoint import CHAT_TOKENS, SPECIAL_TOKENS, wrap_tokenizer  # noqa: E402

DEFAULT_OUT = REPO / "engine" / "demo_model"

# The one size, on a CPU or a GPU. A larger one (hidden 256, intermediate 640, 4096 tokens, batch
# 64 x 256) overfitted the 430 k-token text within 20 s on the H100 (best held-out loss 5.10 at
# step 355, then rising to 9.3): the text, not the compute, bounds this model.
SIZE = dict(hidden=192, layers=4, heads=6, kv_heads=2, inter=384, vocab=3072, seq=128, batch=16)


def _clean(text: str) -> str:
    """Prose only: drop code-like, table and short lines; re-flow wrapped paragraphs."""
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if not s:
            lines.append("")
            continue
        if s.startswith((">>>", "...", "|", "+-", "==", "--", "**", ":")):
            continue
        letters = sum(c.isalpha() or c == " " for c in s)
        if letters < 0.85 * len(s) or len(s) < 20:
            continue
        lines.append(s)
    paras = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n")]
    return "\n\n".join(p for p in paras if len(p.split()) >= 6)


def load_text() -> list[str]:
    """The documents: one per pydoc topic, then one per standard-library module's docstrings.

    Both are part of CPython (PSF licence) and sit on every machine with Python; the library's
    own test suite, idlelib and site-packages are left out. Sorted, so the order is fixed.
    """
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    docs = [_clean(topics[key]) for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__phello__")
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in skip for part in path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        strings = [ast.get_docstring(n) for n in nodes]
        docs.append(_clean("\n\n".join(s for s in strings if s)))
    return [d for d in docs if d]


def build_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.add_special_tokens(list(CHAT_TOKENS))
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return wrap_tokenizer(tok)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of the training loop")
    parser.add_argument(
        "--steps", type=int, default=None, help="fixed step count (overrides the time schedule)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    size = SIZE

    docs = load_text()
    tokenizer = build_tokenizer(docs, size["vocab"])
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d)["input_ids"] + [eos]  # "<s> doc </s>"
    data = torch.tensor(ids, dtype=torch.long)
    n_val = max(len(data) // 40, size["seq"] * 8)
    train, val = data[:-n_val], data[-n_val:]
    print(
        f"text: {len(docs)} topics, {sum(map(len, docs))} chars, {len(data)} tokens "
        f"(train {len(train)}, val {len(val)}), vocab {len(tokenizer)}",
        flush=True,
    )

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        initializer_range=0.02,
    )
    model = MixtralForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    seq, batch = size["seq"], size["batch"]
    warmup = 20

    def get_batch(src: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - seq - 1, (batch,), generator=g)
        return torch.stack([src[s : s + seq + 1] for s in starts]).to(args.device)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(1234)
        losses = []
        for _ in range(4):
            x = get_batch(val, g)
            losses.append(lm_loss(x)[0].item())
        model.train()
        return sum(losses) / len(losses)

    # next-token cross-entropy on a (batch, seq + 1) window: inputs x[:, :-1], targets x[:, 1:]
    def lm_loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(input_ids=x[:, :-1])
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        return loss, out.aux_loss

    budget = args.minutes * 60.0
    t0 = time.monotonic()
    best = (float("inf"), None, 0)
    step = 0
    last_eval = t0
    eval_every = 120.0 if args.device == "cpu" else 20.0
    model.train()
    while True:
        elapsed = time.monotonic() - t0
        frac = step / args.steps if args.steps else elapsed / budget
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = get_batch(train, gen)
        loss, aux = lm_loss(x)
        total = loss + config.router_aux_loss_coef * aux if aux is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.monotonic()
        if step % 25 == 0:
            print(f"step {step} t={now - t0:.0f}s lr={lr:.2e} loss={loss.item():.3f}", flush=True)
        if now - last_eval >= eval_every:
            last_eval = now
            v = evaluate()
            if v < best[0]:
                best = (v, copy.deepcopy(model.state_dict()), step)
            print(f"  eval step {step}: val loss {v:.3f} (best {best[0]:.3f} at step {best[2]})", flush=True)
    v = evaluate()
    if v < best[0]:
        best = (v, copy.deepcopy(model.state_dict()), step)
    train_s = time.monotonic() - t0
    print(
        f"done: {step} steps in {train_s:.0f}s; final val loss {v:.3f}; best {best[0]:.3f} at step {best[2]}",
        flush=True,
    )

    model.load_state_dict(best[1])
    model = model.to("cpu", torch.bfloat16).eval()
    model.config.output_router_logits = False
    model.config.dtype = torch.bfloat16
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = dict(
        text=f"CPython {sys.version.split()[0]} pydoc_data.topics + standard-library docstrings (PSF licence)",
        params=n_params,
        steps=step,
        best_step=best[2],
        train_seconds=round(train_s),
        best_val_loss=round(best[0], 4),
        final_val_loss=round(v, 4),
        device=args.device,
        seed=args.seed,
        size=size,
        lr=args.lr,
        torch=torch.__version__,
    )
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
