"""The scheduler is pure Python: tested with sequences and block accounting only."""

from __future__ import annotations

from engine.kv_cache import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


def _seq(name: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))


def _run(out) -> None:
    """What the engine does after a step: mark tokens computed, append a token when sampled."""
    for chunk in out.chunks:
        completes = chunk.completes_sequence
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if completes:
            chunk.seq.output_token_ids.append(1)


def test_long_prefill_is_chunked_and_decodes_come_first() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_prefill_chunk=8), BlockManager(100, 4))
    short = _seq("short", 3)
    sched.add(short)
    _run(sched.schedule())  # short is now decoding
    long = _seq("long", 30)
    sched.add(long)
    for expected_prefill in (8, 8, 8, 6):
        out = sched.schedule()
        assert [c.seq.request_id for c in out.decodes] == ["short"]  # never stalled by the long prompt
        assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("long", expected_prefill)]
        _run(out)
    out = sched.schedule()
    assert sorted(c.seq.request_id for c in out.decodes) == ["long", "short"] and not out.prefills


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=10, max_prefill_chunk=10),
                      BlockManager(100, 4))
    for i in range(4):
        sched.add(_seq(f"s{i}", 6))
    out = sched.schedule()
    assert out.num_tokens <= 10
    assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("s0", 6), ("s1", 4)]
    _run(out)
    out = sched.schedule()
    assert len(sched.running) == 2 and [c.seq.request_id for c in out.decodes] == ["s0"]
    assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("s1", 2)]


def test_admission_waits_for_blocks_first_come_first_served() -> None:
    bm = BlockManager(4, 4)  # 16 tokens of KV
    sched = Scheduler(SchedulerConfig(), bm)
    big, small = _seq("big", 12), _seq("small", 2)
    sched.add(big)
    _run(sched.schedule())
    sched.add(_seq("blocked", 8))
    sched.add(small)
    out = sched.schedule()
    # "blocked" needs 2 blocks with 1 free: it waits, and "small" does not overtake it
    assert [c.seq.request_id for c in out.prefills] == []
    sched.finish(big, FinishReason.STOP)
    assert bm.num_free_blocks == 4
    out = sched.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["blocked", "small"]


def test_decode_out_of_blocks_preempts_newest_and_recomputes_later() -> None:
    bm = BlockManager(3, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    a, b = _seq("a", 4), _seq("b", 4)
    sched.add(a)
    sched.add(b)
    _run(sched.schedule())  # a, b prefilled: 2 blocks used, each now has 5 tokens
    out = sched.schedule()  # both need a second block; only 1 free: b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [c.seq.request_id for c in out.decodes] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b
    _run(out)
    sched.finish(a, FinishReason.STOP)
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("b", 5)]  # prompt + its output
