"""``crossinfer serve -tp 2`` as users run it: the API server starts its engine-core process,
which starts the second rank itself. The openai SDK's streaming and whole completions and chat
work, and Ctrl-C stops every process; killing the worker (or the engine core) is noticed
while the server is idle, reported (/health answers 503 with the reason while it drains, the
log names the rank) and the server exits with status 1 within seconds, leaving no process
behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from crossinfer_conformance.checks.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2 query heads sharing 1 KV head: a head each, the KV head on both ranks
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-tp"), head_size=16, seed=2)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture
def server(model: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "crossinfer.cli", "serve", "--model", str(model),
               "--device", "cpu", "-tp", "2", "--port", str(port), "--max-model-len", "512",
               "--kv-cache-memory", "1MiB", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "CROSSINFER_NO_PROGRESS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-4000:]
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_openai_sdk_streams_completions_and_chat(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = server
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    name = client.models.list().data[0].id
    args = {"model": name, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(prompt="w5 w6 w7", **args).choices[0].text
    stream = client.completions.create(prompt="w5 w6 w7", stream=True, **args)
    assert "".join(chunk.choices[0].text for chunk in stream) == whole
    assert len(whole.split()) == 12
    messages = [{"role": "user", "content": "w9 w10 w11"}]
    chat = client.chat.completions.create(messages=messages, **args)  # type: ignore[arg-type]
    streamed = client.chat.completions.create(messages=messages, stream=True, **args)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content and text
    # A client that goes away mid-stream: its blocks come back, and both ranks go on in step.
    long = client.completions.create(
        prompt="w5 w6 w7",
        stream=True,
        extra_body={"ignore_eos": True},
        **{**args, "max_tokens": 480},
    )
    next(iter(long))
    assert _kv_usage(url) > 0  # still generating (480 tokens take seconds here)
    long.close()
    deadline = time.monotonic() + 10
    while _kv_usage(url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _kv_usage(url) == 0
    assert client.completions.create(prompt="w5 w6 w7", **args).choices[0].text == whole
    (core,) = _children(process.pid)  # the engine-core process
    workers = _children(core)  # rank 1
    assert len(workers) == 1
    # Ctrl-C as a terminal sends it: SIGINT to the whole group (SIGTERM is the torchrun test's)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) in (0, -signal.SIGINT)
    assert _gone([core, *workers])
    assert "Traceback" not in process.communicate()[0]


def test_a_killed_worker_is_reported_and_the_server_exits(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = server
    (core,) = _children(process.pid)
    (worker,) = _children(core)
    os.kill(worker, signal.SIGKILL)
    started = time.monotonic()
    # /health answers 503 with the reason while the server drains; with nothing in flight
    # that is short, so it may be gone before a poll sees it.
    while process.poll() is None and time.monotonic() - started < 30:
        try:
            health = httpx.get(url + "/health", timeout=5)
        except httpx.TransportError:
            break
        if health.status_code != 200:
            assert health.status_code == 503 and "tensor-parallel rank 1" in health.text
        time.sleep(0.1)
    assert process.wait(30) == 1
    assert time.monotonic() - started < 30
    output = process.communicate()[0]
    assert f"tensor-parallel rank 1 (pid {worker}) exited with code -9" in output
    assert _gone([core, worker])


def test_a_killed_engine_core_is_reported_and_no_rank_is_left(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = server
    (core,) = _children(process.pid)
    (worker,) = _children(core)
    os.kill(core, signal.SIGKILL)
    started = time.monotonic()
    assert process.wait(30) == 1
    assert time.monotonic() - started < 30
    assert "the engine-core process exited (code -9)" in process.communicate()[0]
    assert _gone([worker])  # rank 1 sees its pipe close and exits


def _kv_usage(url: str) -> float:
    """The server's KV-cache usage ratio from /metrics."""
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if not line.startswith("#") and "kv_cache_usage_ratio" in line:
            return float(line.split()[-1])
    raise AssertionError("no kv_cache_usage_ratio in /metrics")


def _gone(pids: list[int], within_s: float = 10.0) -> bool:
    """Every one of ``pids`` has exited (and been reaped) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _children(parent: int) -> list[int]:
    """``parent``'s children that multiprocessing spawned (the engine core of the server,
    the tensor-parallel ranks of the engine core)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "spawn_main" in cmdline:
            found.append(int(entry))
    return found
