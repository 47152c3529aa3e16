"""The engine loop and its asyncio client without Ray: a request another client added (the ingress's fast path) is
followed without a second add, its outputs kept until its stream exists; an add with a subscriber gets its
refusal on the subscriber's channel too; an abort that overtakes its add (two connections) still wins."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import REFUSED, AsyncEngine, EngineLoop, StepReport
from nanovllm_ray.engine.llm_engine import EngineStats, LLMEngine
from nanovllm_ray.engine.output import RequestOutput
from nanovllm_ray.sampling_params import SamplingParams

STATS = EngineStats(0, 0, 0.0, 16, 0, 0, 0)


class _Core:
    """Stands in for RemoteCore: records what the client sends."""

    initial_stats = STATS

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def start(self, client: AsyncEngine) -> None:
        pass

    def submit(self, cmds: list[tuple]) -> None:
        self.sent += cmds


def test_an_adopted_request_takes_the_outputs_that_came_before_its_stream():
    async def main():
        core = _Core()
        engine = AsyncEngine(core)
        # the engine's first and last outputs reach this client before the LLMServer's call does
        first = RequestOutput("r1", [5], num_prompt_tokens=3, num_generated_tokens=1)
        last = RequestOutput("r1", [6, 7], "length", num_prompt_tokens=3, num_generated_tokens=3)
        engine.on_report(StepReport([first.pack()], STATS))
        engine.on_report(StepReport([last.pack()], STATS))
        outs = [o async for o in engine.generate("r1", [1, 2, 3], SamplingParams(max_tokens=3), "ingress-x",
                                                 adopt=True)]
        await asyncio.sleep(0)
        assert outs[-1].finished and outs[-1].num_generated_tokens == 3
        assert core.sent == []  # neither an add (the ingress sent it) nor an abort (it finished)
        # the ordinary path sends the add, and an abort when the reader leaves early
        async def read() -> None:
            async for _ in engine.generate("r2", [1, 2], SamplingParams(max_tokens=4), "ingress-x"):
                pass

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert [c[:2] for c in core.sent] == [("add", "r2"), ("abort", "r2")]
        assert not engine._orphans

    asyncio.run(main())


def test_orphans_expire():
    engine = AsyncEngine(_Core())
    engine.ORPHAN_TTL_S = 0.0
    engine.on_report(StepReport([RequestOutput("gone", [1], num_generated_tokens=1).pack()], STATS))
    engine.on_report(StepReport([RequestOutput("next", [1], num_generated_tokens=1).pack()], STATS))
    assert "gone" not in engine._orphans


@pytest.fixture(scope="module")
def loop_engine(tiny_model):
    reports: list[StepReport] = []
    got = threading.Condition()

    def on_report(r: StepReport) -> None:
        with got:
            reports.append(r)
            got.notify_all()

    engine = LLMEngine(Config.from_kwargs(tiny_model, device="cpu", num_kvcache_blocks=64, max_model_len=256))
    loop = EngineLoop(engine, on_report, lambda e: None)
    loop.start()

    def wait_for(pred, timeout_s: float = 60.0):
        with got:
            assert got.wait_for(lambda: pred(reports), timeout_s), "no such report"
        return reports

    yield loop, wait_for
    loop.stop()
    engine.shutdown()


def _subscribed(reports, sub: str, rid: str) -> list[RequestOutput]:
    return [RequestOutput.unpack(t) for r in reports for t in r.by_subscriber.get(sub, []) if t[0] == rid]


def test_a_refusal_reaches_the_subscriber(loop_engine):
    loop, wait_for = loop_engine
    loop.submit([("add", "long", list(range(300)), SamplingParams(max_tokens=4), "ingress-a")])
    reports = wait_for(lambda rs: _subscribed(rs, "ingress-a", "long"))
    (out,) = _subscribed(reports, "ingress-a", "long")
    assert out.finish_reason == REFUSED and "max_model_len is 256" in out.error
    assert any(t[0] == "long" and t[3] == REFUSED for r in reports for t in r.outputs)  # and the control's


def test_an_abort_before_its_add_wins_and_frees_nothing_twice(loop_engine):
    loop, wait_for = loop_engine
    loop.submit([("abort", "late")])
    loop.submit([("add", "late", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), "ingress-a"),
                 ("add", "ok", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), "ingress-a")])
    reports = wait_for(lambda rs: any(o.finished for o in _subscribed(rs, "ingress-a", "ok")))
    assert not _subscribed(reports, "ingress-a", "late")
    engine = loop.engine
    wait_for(lambda rs: not engine.has_unfinished_requests())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_an_idle_loop_takes_a_command_while_polling_and_after_it():
    """A GPU engine's loop polls for IDLE_SPIN_S before it sleeps on the queue; either way the command arrives."""
    from types import SimpleNamespace

    engine = SimpleNamespace(config=SimpleNamespace(enable_kv_cache_events=False), executor=SimpleNamespace())
    loop = EngineLoop(engine, lambda r: None, lambda e: None)
    assert loop._spin_s == 0.0  # not on a GPU
    for spin_s, delay_s in ((0.5, 0.02), (0.01, 0.1)):  # the command comes while it polls / once it sleeps
        loop._spin_s = spin_s
        threading.Timer(delay_s, loop.submit, [[("abort", f"r{spin_s}")]]).start()
        assert loop._next() == ("abort", f"r{spin_s}")


def test_the_ingress_answers_an_error_for_a_refusal_or_failure_from_the_core():
    """On the fast path the core's refusal (or a failed add) reaches the ingress on its channel, not through the
    LLMServer's call: it must still become an HTTP error before the response starts, never a 200 stream."""
    from deployments.ingress import _as_openai_error, _Run
    from nanovllm_ray.engine.async_engine import ERROR

    run = _Run.__new__(_Run)  # deliver() needs only the queue
    run._queue = asyncio.Queue()
    run.deliver(0, "a", RequestOutput("a", [], REFUSED, error="prompt has 300 tokens; max_model_len is 256"))
    run.deliver(0, "b", RequestOutput("b", [], ERROR, error="the engine could not take this request"))
    (_, _, a), (_, _, b) = run._queue.get_nowait(), run._queue.get_nowait()
    assert (_as_openai_error(a).status, _as_openai_error(b).status) == (400, 500)
    assert "max_model_len is 256" in str(a)


def test_a_whole_response_is_sent_again_when_its_engine_dies_after_the_first_tokens():
    """A response sent whole starts only when its choices finish: a choice whose engine core dies after its first
    tokens is sent again from the start (elsewhere), and the response holds only the new attempt's tokens. A
    stream, whose first event has gone to the client, gets the error."""
    from types import SimpleNamespace

    from deployments.ingress import START_ATTEMPTS, _Run
    from nanovllm_ray import SamplingParams
    from nanovllm_ray.engine.async_engine import EngineDeadError
    from nanovllm_ray.serving.openai_protocol import OpenAIError
    from nanovllm_ray.serving.request_processor import Choice

    class Call:  # an LLMServer call that streams nothing itself (the tokens come on the core's channel)
        def __init__(self):
            self.cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.Event().wait()

        def cancel(self):
            self.cancelled = True

    async def scenario(resend_late: bool) -> tuple[_Run, list]:
        calls = []
        ingress = SimpleNamespace(routes={}, cores_by_replica={}, conns={}, subscriber="s",
                                  llm=SimpleNamespace(generate=SimpleNamespace(
                                      remote=lambda *a, **k: calls.append(Call()) or calls[-1])))

        async def no_pick(*_):
            return None

        ingress.pick = no_pick
        params = SamplingParams(max_tokens=3, detokenize=False)
        run = _Run(ingress, "cmpl-x", [Choice(0, 0, [1, 2, 3], params)], None, resend_late=resend_late)
        run.deliver(0, run._rids[0], RequestOutput(run._rids[0], [7], num_prompt_tokens=3, num_generated_tokens=1))
        await run.start()
        first = run._rids[0]
        run.deliver(0, first, EngineDeadError("the engine core is gone"))
        events = run.events()
        if not resend_late:
            with pytest.raises(OpenAIError):
                async for _ in events:
                    pass
            return run, calls
        consumer = asyncio.ensure_future(run.drain())

        async def resent():
            while run._rids[0] == first:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(resent(), 5)
        run.deliver(0, first, RequestOutput(first, [8], num_generated_tokens=2))  # late, from the lost attempt
        run.deliver(0, run._rids[0], RequestOutput(run._rids[0], [5, 6, 4], "length", num_prompt_tokens=3,
                                                   num_generated_tokens=3))
        await asyncio.wait_for(consumer, 5)
        return run, calls

    run, calls = asyncio.run(scenario(resend_late=True))
    assert len(calls) == 2 and calls[0].cancelled and START_ATTEMPTS >= 2
    assert run.states[0].token_ids == [5, 6, 4] and run.states[0].finished
    run, calls = asyncio.run(scenario(resend_late=False))
    assert len(calls) == 1
