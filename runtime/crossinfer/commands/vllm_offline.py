"""vLLM's offline ``LLM.generate``, driven over stdin/stdout by ``crossinfer bench throughput
--baseline vllm``.

Runs as a script under another interpreter (the one vLLM is installed in), so it imports only
the standard library and vLLM, never crossinfer. Protocol, one JSON object per line:

- first line in: ``{"model", "dtype", "max_model_len", "max_num_seqs",
  "max_num_batched_tokens", "warmup": [[token ids]...], "output_len", "seed", "load_format"}``
  (``"dummy"``: random weights from the folder's config, as crossinfer's); the engine is
  built and warmed up on ``warmup``, then ``{"ready": true, "version": ...}`` goes out;
- each later line in (``{"prompts": [[token ids]...]}``) times one ``generate`` of those
  prompts, greedy, EOS ignored, and answers ``{"seconds", "output_tokens"}``; end of input ends
  the process. Each run brings new prompts, so no run reads another's prefix cache.
"""

from __future__ import annotations

import json
import os
import sys
import time

# vLLM logs to stdout: the protocol keeps the real stdout, everything else goes to stderr.
_PROTOCOL = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def main() -> int:
    setup = json.loads(sys.stdin.readline())
    import vllm  # noqa: PLC0415 - only here: the script must start (and fail) cleanly without it

    llm = vllm.LLM(
        model=setup["model"],
        dtype=setup["dtype"],
        max_model_len=setup["max_model_len"],
        max_num_seqs=setup["max_num_seqs"],
        max_num_batched_tokens=setup["max_num_batched_tokens"],
        seed=setup["seed"],
        load_format=setup.get("load_format", "auto"),
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=setup["output_len"], ignore_eos=True)
    warmup = [{"prompt_token_ids": ids} for ids in setup["warmup"]]
    llm.generate(warmup, vllm.SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    _send({"ready": True, "version": getattr(vllm, "__version__", "unknown")})
    for line in sys.stdin:
        prompts = [{"prompt_token_ids": ids} for ids in json.loads(line)["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        _send({"seconds": seconds, "output_tokens": produced})
    return 0


def _send(message: dict[str, object]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


if __name__ == "__main__":
    sys.exit(main())
