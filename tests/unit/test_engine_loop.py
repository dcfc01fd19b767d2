"""The worker's engine loop: continuous admission, fault isolation, aborts. It runs on the real
EchoEngine; `PoisonedEchoEngine` makes a step fail whenever one chosen request is in the batch,
the way a bad request (or a CUDA OOM it causes) breaks a real engine step."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.echo import EchoEngine
from tests.conftest import MODEL_CACHE_DIR
from workers.engine_loop import EngineLoop, EngineRequest, RequestAborted

PARAMS = SamplingParams(max_tokens=4, temperature=0)


class PoisonedEchoEngine(EchoEngine):
    def __init__(self, poison_id: str) -> None:
        super().__init__(cache_dir=MODEL_CACHE_DIR)
        self.poison_id = poison_id
        self.batches: list[set[str]] = []

    def step(self):
        with self._lock:  # aborted requests are dropped before the "forward", as in LLMEngine
            batch = {rid for rid, out in self._live.items()
                     if out.outputs[0].finish_reason != "abort"}
        self.batches.append(batch)
        if self.poison_id in batch:
            raise RuntimeError("CUDA out of memory (simulated by the test engine)")
        return super().step()


@pytest.fixture
def loop_factory():
    loops: list[EngineLoop] = []

    def make(engine) -> EngineLoop:
        loop = EngineLoop(lambda: engine, batch_wait_seconds=0.05)
        loop.start()
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop(timeout=5)


def test_requests_submitted_together_share_one_engine_step(loop_factory):
    engine = PoisonedEchoEngine(poison_id="none")
    loop = loop_factory(engine)

    futures = [loop.submit(EngineRequest(f"r{i}", f"hello {i}", PARAMS, 1)) for i in range(8)]

    outputs = [f.result(timeout=10) for f in futures]
    assert [o.request_id for o in outputs] == [f"r{i}" for i in range(8)]
    assert max(len(batch) for batch in engine.batches) == 8


def test_an_engine_error_fails_only_the_request_that_caused_it(loop_factory):
    loop = loop_factory(PoisonedEchoEngine(poison_id="bad"))

    futures = {rid: loop.submit(EngineRequest(rid, f"prompt {rid}", PARAMS, 1))
               for rid in ("a", "bad", "b", "c")}

    with pytest.raises(RuntimeError, match="out of memory"):
        futures["bad"].result(timeout=10)
    for rid in ("a", "b", "c"):
        assert futures[rid].result(timeout=10).outputs[0].finish_reason in {"stop", "length"}


def test_a_re_run_aborted_before_it_resumes_keeps_its_output_so_far():
    # given a failed step whose requests wait to re-run, and one of them aborted meanwhile
    # (from the loop's own thread, right after the pass that failed)
    engine = PoisonedEchoEngine(poison_id="bad")
    aborted: list[str] = []

    def abort_after_the_failure() -> None:
        if any("bad" in batch for batch in engine.batches) and not aborted:
            aborted.append("c")
            loop.abort("c")

    loop = EngineLoop(lambda: engine, after_pass=abort_after_the_failure)
    futures = loop.submit_many([EngineRequest(rid, f"prompt {rid}", PARAMS, 1)
                                for rid in ("a", "bad", "c")])
    loop.start()
    try:
        # then it ends as an abort with the tokens its first run made, the others as before
        output = futures[2].result(timeout=10).outputs[0]
        assert aborted and output.finish_reason == "abort" and output.token_ids
        assert futures[0].result(timeout=10).outputs[0].finish_reason in {"stop", "length"}
        with pytest.raises(RuntimeError, match="out of memory"):
            futures[1].result(timeout=10)
    finally:
        loop.stop(timeout=5)
    assert not any("c" in batch for batch in engine.batches[1:])


def test_an_isolated_request_never_shares_a_step(loop_factory):
    engine = PoisonedEchoEngine(poison_id="none")
    loop = loop_factory(engine)
    futures = [loop.submit(EngineRequest(f"n{i}", "x", PARAMS, 1)) for i in range(3)]
    futures.append(loop.submit(EngineRequest("suspect", "x", PARAMS, 1, isolated=True)))
    futures += [loop.submit(EngineRequest(f"m{i}", "x", PARAMS, 1)) for i in range(3)]

    for future in futures:
        future.result(timeout=10)
    assert {"suspect"} in engine.batches
    assert all(batch == {"suspect"} for batch in engine.batches if "suspect" in batch)


def test_an_isolated_request_never_holds_back_an_interactive_one(loop_factory):
    # Regression (issue 21): a suspect waiting for an empty engine, then running alone, held
    # back every request behind it, interactive ones too.
    engine = PoisonedEchoEngine(poison_id="none")
    loop = loop_factory(engine)

    # given a suspect, a batch-class and an interactive request submitted together
    futures = loop.submit_many([EngineRequest("suspect", "x", PARAMS, 1, isolated=True),
                                EngineRequest("batch", "x", PARAMS, 2),
                                EngineRequest("urgent", "x", PARAMS, 0)])
    for future in futures:
        future.result(timeout=10)

    # then the interactive one runs first, the suspect alone, the batch one after it
    step = {rid: next(i for i, batch in enumerate(engine.batches) if rid in batch)
            for rid in ("suspect", "batch", "urgent")}
    assert step["urgent"] < step["suspect"] < step["batch"], engine.batches
    assert engine.batches[step["suspect"]] == {"suspect"}


def test_abort_before_admission_resolves_without_output(loop_factory):
    engine = PoisonedEchoEngine(poison_id="none")
    loop = EngineLoop(lambda: engine)  # not started: nothing is admitted yet
    future = loop.submit(EngineRequest("r", "x", PARAMS, 1))

    loop.abort("r")

    with pytest.raises(RequestAborted):
        future.result(timeout=1)
    assert loop.in_flight() == []


def test_the_engine_is_built_on_the_loop_thread_that_runs_it(loop_factory):
    # Regression: torch CPU kernels ran ~1.7x slower on a thread other than the one that
    # loaded the model, and the worker used to build the engine on its main thread.
    import threading

    built_on: list[str] = []

    def make_engine():
        built_on.append(threading.current_thread().name)
        return PoisonedEchoEngine(poison_id="none")

    loop = EngineLoop(make_engine)
    loop.start()
    try:
        loop.submit(EngineRequest("r", "x", PARAMS, 1)).result(timeout=10)
    finally:
        loop.stop(timeout=5)
    assert built_on == ["genq-engine-loop"]


def test_an_engine_that_fails_to_build_fails_start():
    def make_engine():
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        EngineLoop(make_engine).start()


def test_after_each_pass_every_request_its_step_finished_is_resolved():
    # (the engine process sends each pass's outcomes as one message from this hook)
    futures = []
    resolved_at_each_pass: list[int] = []
    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR), after_pass=lambda:
                      resolved_at_each_pass.append(sum(future.done() for future in futures)))
    futures += loop.submit_many([EngineRequest(f"r{i}", f"hello {i}", PARAMS, 1)
                                 for i in range(8)])
    loop.start()
    try:
        assert [future.result(timeout=10).request_id for future in futures] == [
            f"r{i}" for i in range(8)]
    finally:
        loop.stop(timeout=5)

    assert resolved_at_each_pass[0] == 8  # the echo engine finishes all 8 in its first step


def test_requests_re_run_after_a_failed_step_resume_and_their_deltas_join_to_the_output():
    # Regression (issue 19): the isolated re-run started over, so a stream showed the text of
    # both runs while the output was only the second's.
    from engine import LLMEngine
    from tests.conftest import TINY_MODEL
    from tests.faults.sitecustomize import failing_once

    def make_engine() -> LLMEngine:
        return LLMEngine.from_model(TINY_MODEL, dtype="float32", cache_dir=MODEL_CACHE_DIR,
                                    kv_cache_tokens=4096)

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = {"a": "Once upon a time", "b": "The quick brown fox"}
    # given what two greedy requests produce when nothing fails
    reference = make_engine()
    for rid, prompt in prompts.items():
        reference.add_request(rid, prompt, params)
    expected = {}
    while reference.has_unfinished_requests():
        expected.update({out.request_id: out.outputs[0] for out in reference.step()})

    # when they stream together on an engine whose step fails once they have 8 tokens
    deltas: dict[str, list] = {rid: [] for rid in prompts}
    loop = EngineLoop(make_engine, on_deltas=lambda outputs: [
        deltas[out.request_id].append(out.outputs[0]) for out in outputs])
    loop.start()
    try:
        runner = loop.engine.runner
        runner.run = failing_once(runner.run, 8)
        futures = loop.submit_many([EngineRequest(rid, prompt, params, 1, stream=True)
                                    for rid, prompt in prompts.items()])
        outputs = {f.result(timeout=60).request_id: f.result().outputs[0] for f in futures}
    finally:
        loop.stop(timeout=5)

    # then the step did fail, and each re-run went on from its 8 tokens: its output is the
    # uninterrupted one, and its deltas, first run's and re-run's, join to it
    assert runner.run.failed
    for rid, output in outputs.items():
        assert (output.token_ids, output.text) == (expected[rid].token_ids, expected[rid].text)
        assert [t for d in deltas[rid] for t in d.token_ids] == output.token_ids[:23]
        streamed = "".join(d.text for d in deltas[rid])
        assert streamed and output.text.startswith(streamed)
