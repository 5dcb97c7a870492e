"""The check functions, by the name a Case gives in ``Case.check``.

A check takes the worker's :class:`~crossinfer_conformance.context.CheckContext` and a case,
returns when the backend is right, raises CheckFailed with a message that points at the fault,
or NotSupported. Adding a check means one function here plus its cases in cases.py.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from crossinfer_conformance.cases import Case
from crossinfer_conformance.checks import (
    attention,
    cache_ops,
    capabilities,
    collectives,
    discovery,
    engine,
    memory,
    static,
)
from crossinfer_conformance.outcome import (
    FAILED,
    NOT_SUPPORTED,
    PASSED,
    CaseResult,
    CheckFailed,
    NotSupported,
    describe_exc,
)

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

Check = Callable[["CheckContext", Case], None]

CHECKS: MappingProxyType[str, Check] = MappingProxyType(
    {
        "entry_point": discovery.check_entry_point,
        "api_version": discovery.check_api_version,
        "probe_cheap": discovery.check_probe_cheap,
        "probe_honest": discovery.check_probe_honest,
        "capabilities": capabilities.check_capabilities,
        "attention": attention.check_attention,
        "write_kv": cache_ops.check_write_kv,
        "copy_blocks": cache_ops.check_copy_blocks,
        "memory_info": memory.check_memory_info,
        "allocate_kv_cache": memory.check_allocate_kv_cache,
        "free_memory": memory.check_free_memory,
        **{op: collectives.check_collective for op in collectives.OPS},
        "engine_greedy": engine.check_engine_greedy,
        "engine_prefix_cache": engine.check_engine_prefix_cache,
        "engine_preemption": engine.check_engine_preemption,
        "native_attention": static.check_native_attention,
        "static_padded": static.check_static_padded,
        "static_sink": static.check_static_sink,
        "static_no_recompile": static.check_static_no_recompile,
    }
)


def run_case(ctx: CheckContext, case: Case) -> CaseResult:
    """Run one case and turn what happened into a result; nothing escapes but a crash."""
    try:
        CHECKS[case.check](ctx, case)
    except CheckFailed as exc:
        return CaseResult(FAILED, str(exc))
    except NotSupported as exc:
        return CaseResult(NOT_SUPPORTED, str(exc))
    except Exception as exc:
        return CaseResult(FAILED, f"{describe_exc(exc)} (raised at {_origin(exc)})")
    return CaseResult(PASSED)


def _origin(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno} in {frame.name}"
