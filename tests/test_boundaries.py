"""The core never reaches a vendor SDK: only backends/ may."""

from __future__ import annotations

import re
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime" / "crossinfer"
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(triton|jax|torch_xla|intel_extension_for_pytorch|torch_neuronx)\b"
    r"|torch\.(cuda|xpu|mps)\b",
    re.MULTILINE,
)


def test_runtime_imports_no_vendor_sdk() -> None:
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) > 20
    hits = [
        f"{path.relative_to(RUNTIME)}: {match.group(0).strip()}"
        for path in files
        for match in FORBIDDEN.finditer(path.read_text())
    ]
    assert hits == []


def test_the_pattern_catches_vendor_code() -> None:
    assert FORBIDDEN.search("import triton.language as tl")
    assert FORBIDDEN.search("x = torch.cuda.mem_get_info()")
    assert not FORBIDDEN.search("import torch.distributed as dist")
