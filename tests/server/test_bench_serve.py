"""`crossinfer bench serve` against the test server, and its PNG encoder."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from crossinfer.cli import main
from crossinfer.commands.png_plot import encode_png
from tests.server.conftest import MODEL


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body)
        chunks[tag] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert (_decode_png(encode_png(pixels)) == pixels).all()


@pytest.mark.slow
def test_bench_serve_small_sweep(
    base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--url", base_url, "--concurrency", "1,2", "--num-requests", "2"]
    argv += ["--input-len", "8", "--output-len", "4", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench_serve.json").read_text())
    assert report["model"] == MODEL
    levels = report["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["failed"] == 0 and level["num_requests"] == 2
        assert level["output_tokens"] == 2 * 4 and level["mean_prompt_tokens"] == 8
        assert level["output_tokens_per_s"] > 0 and level["requests_per_s"] > 0
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
        assert level["tpot_ms"]["p50"] > 0 and level["itl_ms"]["p50"] > 0
    table = (tmp_path / "bench_serve.md").read_text()
    assert table.startswith("| concurrency |") and table.count("\n") == 4
    assert table.strip() in capsys.readouterr().out
    image = _decode_png((tmp_path / "bench_serve.png").read_bytes())
    assert image.shape[2] == 3 and (image != 255).any()
