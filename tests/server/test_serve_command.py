"""`crossinfer serve`: its flags, and a missing device failing before anything loads."""

from __future__ import annotations

import time

import pytest

from crossinfer.cli import build_parser, main


def test_serve_flags() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--device", "cpu",
            "--port", "9001",
            "--served-model-name", "tiny",
            "--api-key", "k",
            "--max-model-len", "1024",
            "--max-num-seqs", "8",
            "--max-num-batched-tokens", "512",
            "--kv-cache-memory", "64MiB",
            "--no-enable-prefix-caching",
            "--dtype", "float32",
        ]
    )  # fmt: skip
    assert (args.host, args.port, args.served_model_name, args.api_key) == (
        "127.0.0.1",
        9001,
        "tiny",
        "k",
    )
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (1024, 8, 512)
    assert args.kv_cache_memory == 64 << 20 and args.enable_prefix_caching is False
    assert args.model is None and args.dtype == "float32" and args.max_body_bytes == 1 << 20
    with pytest.raises(SystemExit):  # the two KV budgets exclude each other
        build_parser().parse_args(
            ["serve", "--kv-cache-memory", "1GiB", "--memory-utilization", "0.5"]
        )


@pytest.mark.parametrize(("device", "reason"), [("rocm", "rocm"), ("xpu", "built without XPU")])
def test_missing_device_fails_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], device: str, reason: str
) -> None:
    import crossinfer.engine.setup as setup

    def no_loading(path: object) -> None:
        raise AssertionError("the model was opened before the device was resolved")

    monkeypatch.setattr(setup, "open_model", no_loading)
    start = time.monotonic()
    monkeypatch.delenv("CROSSINFER_EMULATE", raising=False)
    assert main(["serve", "--device", device]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.startswith("crossinfer: error:") and reason in err


def test_bench_serve_flags() -> None:
    args = build_parser().parse_args(["bench", "serve", "--url", "http://h:1"])
    assert (args.url, args.concurrency, args.input_len, args.output_len) == (
        "http://h:1",
        "1,4,16,32",
        128,
        128,
    )
