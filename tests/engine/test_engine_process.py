"""The engine in its own process (``ProcessEngine``): the same text, tokens and logprobs as the
in-process engine, stop strings found by the API server's side, refusals, a start that fails
with its reason, and no process left behind when the API server's process is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crossinfer import LLM, SamplingParams
from crossinfer.engine.core_client import EngineStartError, ProcessEngine
from crossinfer.engine.frontend import GenerateRequest
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.setup import EngineConfig, LoadedModel
from crossinfer_conformance.checks.tiny_model import build_tiny_model
from tests.engine.client_checks import check_closing_aborts, check_refusals, wait_idle

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(device="cpu", max_model_len=256, kv_cache_memory=32 << 20)
PROMPTS = ["The sky is", "Hello, my name is", "1, 2, 3, 4,"]
CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    "stop": SamplingParams(temperature=0, max_tokens=24, stop=[" of", ","]),
    "stop kept": SamplingParams(
        temperature=0, max_tokens=24, stop=[","], include_stop_str_in_output=True
    ),
    "seeded n=3": SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=7, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, max_tokens=5, logprobs=2, prompt_logprobs=1),
    "stop token": SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[28]),  # ","
}  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Iterator[ProcessEngine]:
    engine = ProcessEngine.launch(CONFIG, log_level="warning")
    yield engine
    engine.shutdown()
    assert not engine.process.is_alive()


def _run(engine: ProcessEngine, params: SamplingParams) -> list[RequestOutput]:
    async def main() -> list[RequestOutput]:
        requests = [GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
        stream = await engine.add_requests(requests)
        final: dict[str, RequestOutput] = {}
        deltas: dict[tuple[str, int], str] = {}
        async for output in stream:
            for c in output.outputs:
                deltas[output.request_id, c.index] = (
                    deltas.get((output.request_id, c.index), "") + c.delta
                )
            if output.finished:
                final[output.request_id] = output
        for (request_id, index), text in deltas.items():  # the streamed deltas add up
            assert text == final[request_id].outputs[index].text
        return [final[f"r{i}"] for i in range(len(PROMPTS))]

    return asyncio.run(main())


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_the_in_process_engine(
    engine: ProcessEngine, smollm2_loaded: LoadedModel, case: str
) -> None:
    params = CASES[case]
    got = _run(engine, params)
    llm = LLM(device="cpu", loaded=smollm2_loaded, max_model_len=256, kv_cache_memory=32 << 20)
    want = llm.generate(PROMPTS, params)
    for g, w in zip(got, want, strict=True):
        assert g.prompt_token_ids == w.prompt_token_ids and g.prompt == w.prompt
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert (gc.text, gc.token_ids, gc.finish_reason, gc.stop_reason) == (
                wc.text, wc.token_ids, wc.finish_reason, wc.stop_reason
            )  # fmt: skip
            assert (gc.logprobs is None) == (wc.logprobs is None)
            if gc.logprobs is not None and wc.logprobs is not None:
                assert [t.token_id for t in gc.logprobs] == [t.token_id for t in wc.logprobs]
                for a, b in zip(gc.logprobs, wc.logprobs, strict=True):
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if g.prompt_logprobs is not None and w.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
    if case.startswith("stop"):
        assert any(c.finish_reason == "stop" for g in got for c in g.outputs)
    wait_idle(engine)  # a sample stopped by its text is stopped in the core too


def test_refusals_come_back_from_the_core(engine: ProcessEngine) -> None:
    check_refusals(engine)


def test_closing_a_stream_aborts_in_the_core(engine: ProcessEngine) -> None:
    check_closing_aborts(engine)


def test_a_start_that_fails_says_why(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="not-there"):
        ProcessEngine.launch(EngineConfig(device="cpu", model=str(tmp_path / "not-there")))
    assert time.monotonic() - started < 60


SCRIPT = """
import sys, time
from crossinfer.engine.core_client import ProcessEngine
from crossinfer.engine.setup import EngineConfig
if __name__ == "__main__":
    engine = ProcessEngine.launch(EngineConfig(device="cpu", model=sys.argv[1], max_model_len=64,
                                               kv_cache_memory=1 << 20), log_level="warning")
    print(engine.process.pid, flush=True)
    time.sleep(600)
"""


def test_the_core_exits_when_the_api_server_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SCRIPT)
    model = build_tiny_model(tmp_path / "tiny", head_size=16, seed=1)
    server = subprocess.Popen([sys.executable, str(script), str(model)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        core = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{core}").exists() and _state(core) != "Z":
            assert time.monotonic() < deadline, "the engine core outlived its API server"
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
