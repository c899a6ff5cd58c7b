"""AsyncEngine over the real LLMEngine: streams, abort, admission, failures, drain."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.async_engine import (
    AsyncEngine,
    EngineStoppedError,
    GenerateRequest,
    QueueFullError,
    RequestRejectedError,
)
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.server.live_server import GatedEngine, PacedEngine, build_engine


@pytest.fixture
def llm(tiny_model_dir: Path) -> LLMEngine:
    return build_engine(tiny_model_dir)


@pytest.fixture
def engine(llm: LLMEngine) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(llm, max_queue_size=8)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def prompt(llm: LLMEngine) -> list[int]:
    return llm.tokenizer.encode("Once upon a time")


def test_generate_streams_deltas(engine: AsyncEngine, llm: LLMEngine) -> None:
    async def main() -> list[Any]:
        return [out async for out in engine.generate("r1", prompt(llm), greedy(10))]

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert sum(len(o.delta_token_ids) for o in outputs) == 10
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text
    assert not any(o.finished for o in outputs[:-1])


def test_submit_many_interleaves_and_finishes_all(engine: AsyncEngine, llm: LLMEngine) -> None:
    async def main() -> dict[int, int]:
        counts: dict[int, int] = {}
        requests = [GenerateRequest(f"m{i}", prompt(llm), greedy(3 + i)) for i in range(4)]
        with engine.submit(requests) as stream:
            async for index, out in stream:
                counts[index] = counts.get(index, 0) + len(out.delta_token_ids)
        return counts

    assert asyncio.run(main()) == {0: 3, 1: 4, 2: 5, 3: 6}


def test_abort_frees_kv_at_once(engine: AsyncEngine, llm: LLMEngine) -> None:
    async def main() -> Any:
        stream = engine.generate("long", prompt(llm), greedy(200))
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        await stream.aclose()  # leaving early aborts
        for _ in range(200):
            snapshot = engine.stats()
            if snapshot.num_unfinished == 0 and snapshot.engine_stats.num_running == 0:
                return snapshot
            await asyncio.sleep(0.01)
        return engine.stats()

    snapshot = asyncio.run(main())
    stats = snapshot.engine_stats
    assert snapshot.num_unfinished == 0
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


class LockstepEngine(GatedEngine):
    """Steps only as fast as the consumer reads: no race between a fast engine and the abort."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.permits = threading.Semaphore(1)

    def step(self) -> Any:
        if not self.gate.is_set():
            self.permits.acquire()
        return self.inner.step()


def test_abort_delivers_final_abort_output(llm: LLMEngine) -> None:
    lockstep = LockstepEngine(llm)
    engine = AsyncEngine(lockstep, max_queue_size=8)  # type: ignore[arg-type]
    engine.start()

    async def main() -> Any:
        last = None
        async for out in engine.generate("to-abort", prompt(llm), greedy(200)):
            last = out
            if len(out.token_ids) == 2:
                engine.abort("to-abort")
                lockstep.gate.set()  # free-running from here: the abort must still win
            lockstep.permits.release()
        return last

    try:
        last = asyncio.run(main())
    finally:
        lockstep.gate.set()
        lockstep.permits.release()
        engine.shutdown()
    assert last.finished and last.finish_reason == "abort"
    assert len(last.token_ids) < 200


def test_queue_full_and_atomic_admission(llm: LLMEngine) -> None:
    gated = GatedEngine(llm)
    engine = AsyncEngine(gated, max_queue_size=3)  # type: ignore[arg-type]
    engine.start()

    async def main() -> list[int]:
        held = engine.submit([GenerateRequest(f"a{i}", prompt(llm), greedy(2)) for i in range(2)])
        with pytest.raises(QueueFullError) as caught:
            engine.submit([GenerateRequest(f"b{i}", prompt(llm), greedy(2)) for i in range(2)])  # all or none
        assert caught.value.retry_after_s > 0
        third = engine.submit([GenerateRequest("c", prompt(llm), greedy(2))])
        with pytest.raises(QueueFullError):
            engine.submit([GenerateRequest("d", prompt(llm), greedy(2))])
        gated.gate.set()
        counts = [0, 0, 0]
        with held, third:
            async for index, out in held:
                counts[index] += len(out.delta_token_ids)
            async for _, out in third:
                counts[2] += len(out.delta_token_ids)
        return counts

    try:
        assert asyncio.run(main()) == [2, 2, 2]
        assert engine.stats().num_waiting_first_output == 0
    finally:
        gated.gate.set()
        engine.shutdown()


def test_rejected_request_raises(engine: AsyncEngine, llm: LLMEngine) -> None:
    async def main() -> None:
        async for _ in engine.generate("too-long", prompt(llm), greedy(10_000)):
            pass

    with pytest.raises(RequestRejectedError, match="maximum context length"):
        asyncio.run(main())
    assert engine.stats().num_unfinished == 0


class ExplodingEngine:
    """The real engine whose step raises (outside LLMEngine's own guard) once, at the step call
    `explode_at` counts down to (set before the request: the engine thread, not the consumer,
    decides when, so a fast loop cannot finish the request first)."""

    def __init__(self, inner: LLMEngine) -> None:
        self.inner = inner
        self.explode_at: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self) -> Any:
        if self.explode_at is not None:
            self.explode_at -= 1
            if self.explode_at <= 0:
                self.explode_at = None
                raise RuntimeError("boom")
        return self.inner.step()


def test_step_exception_fails_requests_and_loop_survives(llm: LLMEngine) -> None:
    exploding = ExplodingEngine(llm)
    engine = AsyncEngine(exploding)  # type: ignore[arg-type]
    engine.start()

    async def run(request_id: str) -> Any:
        last = None
        async for out in engine.generate(request_id, prompt(llm), greedy(20)):
            last = out
        return last

    try:
        exploding.explode_at = 3  # the prefill, a decode step, then the exception
        failed = asyncio.run(run("x"))
        assert failed.finish_reason == "error" and "boom" in failed.error
        assert len(failed.token_ids) < 20
        ok = asyncio.run(run("y"))
        assert ok.finish_reason == "length" and len(ok.token_ids) == 20
        assert llm.stats().num_free_blocks == llm.stats().num_total_blocks
    finally:
        engine.shutdown()


def test_drain_waits_then_aborts_the_rest(llm: LLMEngine) -> None:
    # 5 ms a step at least: the long request (240 steps) outlasts the 0.3 s drain on any machine,
    # the short one (3 steps) ends well within it
    engine = AsyncEngine(PacedEngine(llm, 0.005))
    engine.start()

    async def main() -> tuple[Any, Any, bool]:
        short = engine.generate("short", prompt(llm), greedy(3))
        long = engine.generate("long", prompt(llm), SamplingParams(max_tokens=240, ignore_eos=True))
        first_short = await short.__anext__()
        first_long = await long.__anext__()
        drained = asyncio.ensure_future(asyncio.to_thread(engine.drain, 0.3))
        while engine.accepting:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineStoppedError):
            async for _ in engine.generate("late", prompt(llm), greedy(3)):
                pass
        outs_short = [first_short] + [out async for out in short]
        outs_long = [first_long] + [out async for out in long]
        return outs_short[-1], outs_long[-1], await drained

    try:
        last_short, last_long, all_finished = asyncio.run(main())
        assert last_short.finish_reason == "length"
        assert last_long.finish_reason == "abort" and not all_finished
        assert llm.stats().num_free_blocks == llm.stats().num_total_blocks
    finally:
        engine.shutdown()
    assert not engine.is_running


def test_lagging_consumer_gets_merged_deltas(engine: AsyncEngine, llm: LLMEngine) -> None:
    async def main() -> list[Any]:
        outputs = []
        stream = engine.generate("lagging", prompt(llm), greedy(40))
        outputs.append(await stream.__anext__())
        await asyncio.to_thread(time.sleep, 0.3)  # the engine runs ahead
        outputs.extend([out async for out in stream])
        return outputs

    outputs = asyncio.run(main())
    final = outputs[-1]
    assert final.finished and len(final.token_ids) == 40
    assert [t for o in outputs for t in o.delta_token_ids] == final.token_ids
    assert "".join(o.delta_text for o in outputs) == final.text
    assert len(outputs) < 40  # several tokens per delta after the pause


def test_engine_package_needs_no_server_dependencies() -> None:
    code = ("import sys\n"
            "for name in ('fastapi', 'pydantic', 'starlette', 'uvicorn', 'sse_starlette', 'prometheus_client'):\n"
            "    sys.modules[name] = None\n"
            "import engine.async_engine\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
