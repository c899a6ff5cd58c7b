"""`scheinfer`: one command line for generating, serving and (later) planning and profiling."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

app = typer.Typer(help="ScheInfer: LLM inference over CPU, GPU and PCIe at once.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

from engine.cli_placement import register as register_placement  # noqa: E402

register_placement(app)  # `scheinfer profile` and `scheinfer plan`


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Checkpoint directory, or a name from configs/models/ with --random-weights")],
    prompt: Annotated[list[str], typer.Option(help="Prompt text (repeat for a batch)")] = [],  # noqa: B006
    prompt_token_ids: Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the checkpoint's chat template")] = False,
    device: str = "cpu",
    dtype: str = "auto",
    random_weights: bool = False,
    gpu_memory_budget: Annotated[str | None, typer.Option(help='GPU memory cap, e.g. "24GiB"')] = None,
    policy: Annotated[str, typer.Option(help="auto, adaptive, gpu, cpu-experts, stream, fiddler, balanced:cg=F, manual:cg=F, manual:PLAN.json")] = "auto",
    compact_host_weights: Annotated[bool | None, typer.Option(
        help="Store host weight pieces compact (lossless, 3/4 of the bytes; default: on with AVX512/AMX kernels)",
        show_default=False)] = None,
    host_chunk_rows: Annotated[int, typer.Option(
        min=32, help="Rows of a host weight piece (512 balances decode finer, prefill slower)")] = 1024,
    trace: Annotated[str | None, typer.Option(help="Write a Chrome trace of CPU/PCIe/GPU activity to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt")] = False,
) -> None:
    """Generate text for one or more prompts and print it."""
    from engine import LLM, SamplingParams
    from engine.llm_engine import RequestError
    from engine.model.config import UnsupportedModelError
    from engine.model.loader import CheckpointError
    from engine.sampling_params import SamplingParamsError

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        llm = LLM(model, device=device, dtype=dtype, random_weights=random_weights,
                  gpu_memory_budget=gpu_memory_budget, policy=policy, compact_host_weights=compact_host_weights,
                  host_chunk_rows=host_chunk_rows, trace=trace is not None)
        start_s = time.perf_counter()
        if prompt_token_ids is not None:
            ids = [int(t) for t in prompt_token_ids.split(",") if t.strip()]
            outputs = llm.generate(prompt_token_ids=[ids], params=params)
        elif chat:
            if llm.tokenizer is None:
                raise RequestError("--chat needs a tokenizer; this model has none")
            token_lists = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompt]
            outputs = llm.generate(prompt_token_ids=token_lists, params=params)
        else:
            if not prompt:
                raise RequestError("give --prompt or --prompt-token-ids")
            outputs = llm.generate(prompt, params)
        elapsed_s = time.perf_counter() - start_s
    except (CheckpointError, UnsupportedModelError, RequestError, SamplingParamsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    for out in outputs:
        if as_json:
            typer.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
        else:
            typer.echo(out.text if llm.tokenizer is not None else " ".join(map(str, out.token_ids)))
    num_tokens = sum(len(o.token_ids) for o in outputs)
    typer.echo(f"[{num_tokens} tokens in {elapsed_s:.2f} s]", err=True)
    recorder = llm.engine.runner.trace
    if trace is not None and recorder is not None:
        recorder.write(trace)
        busy = recorder.summary()
        typer.echo(f"[trace: {trace}; busy cpu {busy['cpu_busy']:.0%} pcie {busy['pcie_busy']:.0%} "
                   f"gpu {busy['gpu_busy']:.0%}, overlap {busy['overlap']:.0%}]", err=True)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Checkpoint directory or model name")] = None,
    config: Annotated[str | None, typer.Option(help="Server preset (YAML)")] = None,
    host: str | None = None,
    port: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    api_key: str | None = None,
    gpu_memory_budget: Annotated[str | None, typer.Option(help='GPU memory cap, e.g. "24GiB"')] = None,
    policy: Annotated[str | None, typer.Option(help="partition policy (see `scheinfer generate --help`)")] = None,
    random_weights: Annotated[bool | None, typer.Option(help="random weights for a model name")] = None,
    compact_host_weights: Annotated[bool | None, typer.Option(
        help="Store host weight pieces compact (lossless, 3/4 of the bytes; default: on with AVX512/AMX kernels)",
        show_default=False)] = None,
    host_chunk_rows: Annotated[int | None, typer.Option(
        help="Rows of a host weight piece (default 1024; 512 balances decode finer, prefill slower)",
        show_default=False)] = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API."""
    try:
        from server.main import serve as run_server
        from server.settings import load_settings
    except ImportError as e:  # the server's dependencies are optional for the engine alone
        typer.echo(f"error: the server needs its dependencies ({e}); pip install scheinfer", err=True)
        raise typer.Exit(2) from e
    overrides = {k: v for k, v in {"model": model, "host": host, "port": port, "device": device,
                                   "dtype": dtype, "api_key": api_key, "gpu_memory_budget": gpu_memory_budget,
                                   "policy": policy, "random_weights": random_weights,
                                   "compact_host_weights": compact_host_weights,
                                   "host_chunk_rows": host_chunk_rows}.items() if v is not None}
    run_server(load_settings(config, **overrides))


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
