"""``--distributed-executor-backend ray``: rank 1 as a Ray actor on a local Ray instance gives
the greedy tokens of one process; a killed actor is noticed while idle and fails the engine
with a clear message; closing the engine leaves no actor process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from crossinfer import LLM, SamplingParams
from crossinfer.engine.errors import EngineFatalError
from tests.engine.test_tensor_parallel import _alive, _folder

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'crossinfer[ray]'")

pytestmark = pytest.mark.slow

PROMPTS = [list(range(10, 40)), [7, 8, 9], list(range(3, 30))]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_ray_actors_give_the_greedy_tokens_of_one_process(tmp_path: Path) -> None:
    folder = str(_folder(tmp_path, "llama-gqa", _tokenizer(tmp_path)))
    args = {"device": "cpu", "dtype": "float32", "max_model_len": 128, "kv_cache_memory": 1 << 20}
    single = LLM(model=folder, **args)
    want = [o.outputs[0].token_ids for o in single.generate(PROMPTS, PARAMS)]
    llm = LLM(model=folder, tensor_parallel_size=2, distributed_executor_backend="ray", **args)
    workers = llm.engine.runner.workers
    assert workers is not None and type(workers).__name__ == "RayWorkers"
    (actor,) = workers.pids
    assert actor != os.getpid()
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == want
        assert llm.engine.lost_reason() is None
        os.kill(actor, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while llm.engine.lost_reason() is None:
            assert time.monotonic() < deadline, "the killed actor was not noticed"
            time.sleep(0.2)
        assert "Ray actor is gone" in (llm.engine.lost_reason() or "")
        with pytest.raises(EngineFatalError, match="Ray actor is gone"):
            llm.generate(PROMPTS[:1], PARAMS)
    finally:
        llm.close()
    assert not _alive([actor])
    assert not ray.is_initialized()  # the instance it started is shut down


def _tokenizer(tmp_path: Path) -> Path:
    from crossinfer_conformance.checks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path / "tokenizer", head_size=16, seed=1)
