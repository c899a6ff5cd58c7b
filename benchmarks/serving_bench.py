"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible server.

Closed loop: `--concurrency` workers each send requests one after another (streamed, with
`ignore_eos` so outputs have exactly the drawn length) until `--num-requests` are done. Reports
aggregate throughput, and TTFT, inter-token latency (ITL) and end-to-end latency p50/p99.

    python benchmarks/serving_bench.py --url http://127.0.0.1:8000 --concurrency 1,4,8 \\
        --prompt-len uniform:64:512 --output-len fixed:128 --num-requests 64

With `--engine-model DIR` (no --url) it also runs the same workload on the engine alone
(AsyncEngine in this process) and through a server started in this process, and prints the ratio
HTTP / engine-alone tokens per second.

Length distributions: `fixed:N`, `uniform:LO:HI`, `normal:MEAN:STD` (clipped to >= 1).
Prompts are token ids (completions endpoint) drawn from [--min-token-id, --max-token-id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


@dataclass
class RequestResult:
    ok: bool
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Report:
    label: str
    concurrency: int
    num_requests: int
    num_failed: int
    duration_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_s: float
    e2e_p99_s: float


def parse_distribution(spec: str) -> tuple[str, list[float]]:
    kind, *values = spec.split(":")
    arity = {"fixed": 1, "uniform": 2, "normal": 2}
    if kind not in arity or len(values) != arity[kind]:
        raise argparse.ArgumentTypeError(f"bad distribution {spec!r}: fixed:N, uniform:LO:HI or normal:MEAN:STD")
    return kind, [float(v) for v in values]


def draw(rng: random.Random, dist: tuple[str, list[float]]) -> int:
    kind, values = dist
    if kind == "fixed":
        return max(1, int(values[0]))
    if kind == "uniform":
        return max(1, rng.randint(int(values[0]), int(values[1])))
    return max(1, round(rng.gauss(values[0], values[1])))


def make_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    prompt_dist, output_dist = parse_distribution(args.prompt_len), parse_distribution(args.output_len)
    prompts, output_lens = [], []
    for _ in range(args.num_requests):
        prompts.append([rng.randrange(args.min_token_id, args.max_token_id) for _ in range(draw(rng, prompt_dist))])
        output_lens.append(draw(rng, output_dist))
    return Workload(prompts, output_lens)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(label: str, concurrency: int, results: list[RequestResult], duration_s: float) -> Report:
    ok = [r for r in results if r.ok]
    num_output = sum(r.num_output_tokens for r in ok)
    num_total = num_output + sum(r.num_prompt_tokens for r in ok)
    itl = [gap for r in ok for gap in r.itl_s]
    return Report(
        label=label, concurrency=concurrency, num_requests=len(results), num_failed=len(results) - len(ok),
        duration_s=duration_s, output_tokens_per_s=num_output / duration_s, total_tokens_per_s=num_total / duration_s,
        requests_per_s=len(ok) / duration_s,
        ttft_p50_ms=1e3 * percentile([r.ttft_s for r in ok], 50), ttft_p99_ms=1e3 * percentile([r.ttft_s for r in ok], 99),
        itl_p50_ms=1e3 * percentile(itl, 50), itl_p99_ms=1e3 * percentile(itl, 99),
        e2e_p50_s=percentile([r.e2e_s for r in ok], 50), e2e_p99_s=percentile([r.e2e_s for r in ok], 99),
    )


# ---- HTTP client ---------------------------------------------------------------------------------


@dataclass
class TokenClock:
    """When output arrived: the first delivery (TTFT) and the gaps between deliveries (ITL)."""

    first_s: float | None = None
    last_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)

    def tick(self) -> None:
        now_s = time.perf_counter()
        if self.first_s is None:
            self.first_s = now_s
        elif self.last_s is not None:
            self.gaps_s.append(now_s - self.last_s)
        self.last_s = now_s


async def http_request(http: httpx.AsyncClient, model: str | None, prompt: list[int], max_tokens: int,
                       temperature: float) -> RequestResult:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    start_s = time.perf_counter()
    clock = TokenClock()
    num_output = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    num_output = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    clock.tick()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end_s = time.perf_counter()
    return RequestResult(True, len(prompt), num_output, (clock.first_s or end_s) - start_s, end_s - start_s,
                         clock.gaps_s)


async def run_http(url: str, api_key: str | None, model: str | None, workload: Workload, concurrency: int,
                   temperature: float) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # TCP_NODELAY: httpx writes headers and body separately; with Nagle's algorithm the body then waits
    # for the server's delayed ACK (~40 ms on Linux loopback), which would be charged to the server.
    transport = httpx.AsyncHTTPTransport(limits=limits,
                                         socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600.0, transport=transport) as http:
        return await _closed_loop(workload, concurrency,
                                  lambda p, n: http_request(http, model, p, n, temperature))


# ---- engine alone ----------------------------------------------------------------------------------


async def engine_request(engine: Any, request_id: str, prompt: list[int], max_tokens: int,
                         temperature: float) -> RequestResult:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    start_s = time.perf_counter()
    clock = TokenClock()
    num_output = 0
    async for out in engine.generate(request_id, prompt, params):
        if out.delta_token_ids:
            clock.tick()
        num_output = len(out.token_ids)
        if out.finished and out.finish_reason not in ("stop", "length"):
            return RequestResult(False, error=str(out.error or out.finish_reason))
    end_s = time.perf_counter()
    return RequestResult(True, len(prompt), num_output, (clock.first_s or end_s) - start_s, end_s - start_s,
                         clock.gaps_s)


async def run_engine(engine: Any, workload: Workload, concurrency: int,
                     temperature: float) -> tuple[list[RequestResult], float]:
    counter = iter(range(10**9))
    return await _closed_loop(workload, concurrency,
                              lambda p, n: engine_request(engine, f"bench-{next(counter)}", p, n, temperature))


async def _closed_loop(workload: Workload, concurrency: int, send: Any) -> tuple[list[RequestResult], float]:
    pending = list(zip(workload.prompts, workload.output_lens, strict=True))
    pending.reverse()
    results: list[RequestResult] = []

    async def worker() -> None:
        while pending:
            prompt, max_tokens = pending.pop()
            results.append(await send(prompt, max_tokens))

    start_s = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start_s


# ---- main -----------------------------------------------------------------------------------------


def print_reports(reports: list[Report]) -> None:
    header = (f"{'label':<8} {'conc':>4} {'reqs':>5} {'fail':>4} {'out tok/s':>10} {'req/s':>7} "
              f"{'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16} {'e2e p50/p99 s':>15}")
    print(header)
    for r in reports:
        print(f"{r.label:<8} {r.concurrency:>4} {r.num_requests:>5} {r.num_failed:>4} {r.output_tokens_per_s:>10.1f} "
              f"{r.requests_per_s:>7.2f} {r.ttft_p50_ms:>8.1f}/{r.ttft_p99_ms:<8.1f} "
              f"{r.itl_p50_ms:>7.2f}/{r.itl_p99_ms:<8.2f} {r.e2e_p50_s:>7.2f}/{r.e2e_p99_s:<7.2f}")


def build_engine(args: argparse.Namespace) -> Any:
    from engine.async_engine import AsyncEngine
    from engine.engine_config import EngineConfig
    from engine.executor.setup import PartitionOptions
    from engine.llm_engine import LLMEngine

    partition = PartitionOptions(args.policy, args.gpu_memory_budget)
    config = EngineConfig(model=args.engine_model, device=args.device, dtype=args.dtype, show_progress=False,
                          random_weights=args.random_weights, kv_cache_tokens=args.kv_cache_tokens,
                          partition=partition)
    return AsyncEngine(LLMEngine(config), max_queue_size=10**6)


def in_process_server(engine: Any, args: argparse.Namespace) -> tuple[str, Any]:
    """Serve `engine` on 127.0.0.1 from a thread of this process; returns (url, uvicorn server)."""
    import threading

    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(model=args.engine_model, max_queue_size=10**6, log_level="warning")
    app = create_app(settings, engine=engine)
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="`model` field to send (default: the server's)")
    parser.add_argument("--engine-model", default=None, help="checkpoint dir: also bench the engine alone")
    parser.add_argument("--random-weights", action="store_true", help="with --engine-model as a model name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--gpu-memory-budget", default=None, help='e.g. "24GiB" (partitioned engine)')
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--kv-cache-tokens", type=int, default=16384)
    parser.add_argument("--http-only", action="store_true", help="skip the engine-alone measurement")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated list")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", default="uniform:16:64")
    parser.add_argument("--output-len", default="fixed:32")
    parser.add_argument("--min-token-id", type=int, default=10)
    parser.add_argument("--max-token-id", type=int, default=256, help="exclusive; keep below the vocab size")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent before each measurement")
    parser.add_argument("--json-out", default=None, help="write the reports here")
    args = parser.parse_args(argv)
    if not args.url and not args.engine_model:
        parser.error("give --url, --engine-model, or both")
    workload = make_workload(args)
    warmup = Workload(workload.prompts[: args.warmup], workload.output_lens[: args.warmup])
    reports: list[Report] = []
    engine = server = None
    url = args.url
    if args.engine_model:
        engine = build_engine(args)
        engine.start()
        if url is None:
            url, server = in_process_server(engine, args)
    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            if engine is not None and not args.http_only:
                asyncio.run(run_engine(engine, warmup, 1, args.temperature))
                results, duration_s = asyncio.run(run_engine(engine, workload, concurrency, args.temperature))
                reports.append(summarize("engine", concurrency, results, duration_s))
            asyncio.run(run_http(url, args.api_key, args.model, warmup, 1, args.temperature))
            results, duration_s = asyncio.run(run_http(url, args.api_key, args.model, workload, concurrency,
                                                       args.temperature))
            reports.append(summarize("http", concurrency, results, duration_s))
            failures = [r.error for r in results if not r.ok]
            if failures:
                print(f"{len(failures)} failed requests, first: {failures[0]}", file=sys.stderr)
    finally:
        if server is not None:
            server.should_exit = True
        if engine is not None:
            engine.shutdown()
    print_reports(reports)
    if engine is not None and not args.http_only:
        for http_report in (r for r in reports if r.label == "http"):
            alone = next(r for r in reports if r.label == "engine" and r.concurrency == http_report.concurrency)
            ratio = http_report.output_tokens_per_s / alone.output_tokens_per_s
            print(f"concurrency {http_report.concurrency}: HTTP / engine-alone output tokens/s = {ratio:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 0 if all(r.num_failed == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
