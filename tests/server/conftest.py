"""One engine, one server and one offline reference for the whole server test session. The
engine runs in its own process, as ``crossinfer serve`` runs it, so every server test goes
through the engine-core process and the API server's detokenising."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.harness import serve_in_thread

MODEL = "smollm2-test"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def server_engine() -> Iterator[Any]:  # ProcessEngine
    from crossinfer.engine.core_client import ProcessEngine
    from crossinfer.engine.setup import EngineConfig

    config = EngineConfig(
        device="cpu", max_model_len=MAX_MODEL_LEN, kv_cache_memory=96 << 20, max_num_seqs=64
    )
    engine = ProcessEngine.launch(config, log_level="warning")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def base_url(server_engine: Any) -> Iterator[str]:
    """The shared server: no API key, default limits."""
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    settings = ServerSettings(served_model_name=MODEL, model_path="smollm2.gguf")
    with serve_in_thread(build_app(server_engine, settings)) as url:
        yield url


@pytest.fixture(scope="session")
def offline(smollm2_loaded: Any) -> Any:  # crossinfer.LLM: the reference for greedy outputs
    from crossinfer import LLM

    return LLM(
        device="cpu", loaded=smollm2_loaded, max_model_len=MAX_MODEL_LEN, kv_cache_memory=64 << 20
    )
