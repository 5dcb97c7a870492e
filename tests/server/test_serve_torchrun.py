"""Multi-node simulated on loopback: two torchrun "nodes" (``--nnodes 2 --nproc-per-node 1``,
rendezvous on 127.0.0.1) run ``crossinfer serve``; rank 0 serves HTTP, rank 1 is its worker,
and the greedy tokens are one process's. Stopping node 0 stops node 1; killing node 1's rank
while nothing runs stops node 0 with the reason within seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from crossinfer import LLM, SamplingParams
from crossinfer_conformance.checks.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_two_torchrun_nodes_serve_the_greedy_tokens_of_one_process(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", head_size=16, seed=4)
    prompt = [5, 6, 7, 8, 9]
    offline = LLM(model=str(model), device="cpu", dtype="float32", max_model_len=64,
                  kv_cache_memory=1 << 20)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = offline.generate([prompt], params)[0].outputs[0].text
    nodes, url = _start_nodes(model)
    try:
        body = {"model": str(model), "prompt": prompt, "max_tokens": 10, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == want
        nodes[0].send_signal(signal.SIGTERM)  # torchrun passes it on to its rank
        for node in nodes:
            node.wait(60)  # node 1's rank leaves when rank 0 says stop
    finally:
        _kill(nodes)
    assert all(n.returncode is not None for n in nodes)


def test_a_rank_killed_while_idle_stops_node_zero(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", head_size=16, seed=4)
    nodes, _ = _start_nodes(model)
    try:
        (rank1,) = _children(nodes[1].pid)
        os.kill(rank1, signal.SIGKILL)
        started = time.monotonic()
        assert nodes[0].wait(60) != 0
        assert time.monotonic() - started < 30
        assert "started by the launcher is gone" in nodes[0].communicate()[0]
    finally:
        _kill(nodes)


def _start_nodes(model: Path) -> tuple[list[subprocess.Popen[str]], str]:
    """Two torchrun nodes serving ``model``, once rank 0 answers /health; and its URL."""
    master, http = _port(), _port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "CROSSINFER_NO_PROGRESS": "1"}
    serve = ["-m", "crossinfer.cli", "serve", "--model", str(model), "--device", "cpu",
             "--dtype", "float32", "--port", str(http), "--max-model-len", "64",
             "--kv-cache-memory", "1MiB", "--log-level", "warning"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(master),
                *serve,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return nodes, url
        except httpx.TransportError:
            time.sleep(0.2)
    _kill(nodes)
    raise AssertionError("the torchrun nodes did not come up: " + nodes[0].communicate()[0][-3000:])


def _kill(nodes: list[subprocess.Popen[str]]) -> None:
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found
