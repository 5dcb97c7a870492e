"""Running a step so that a failure stays with the request that caused it.

The batched forward pass either works for everyone or raises for everyone, without saying
whose input was at fault. So a step that raises is run again one chunk at a time: a chunk
that fails alone is its request's failure, and the others' results are kept. Running a chunk
again is safe: it writes the same keys and values to the same slots, and a block copy
repeats its source. Before that, the backend is synchronised: if that raises too, the device
itself is lost, which no request can be blamed for, and the engine stops.
"""

from __future__ import annotations

import logging

from crossinfer.engine.errors import EngineFatalError
from crossinfer.engine.runner import ModelRunner, StepResult
from crossinfer.engine.scheduler import SchedulerOutput

logger = logging.getLogger("crossinfer.engine")

Failure = tuple[str, BaseException]  # (request id, what it raised)


def execute_isolating(
    runner: ModelRunner, output: SchedulerOutput
) -> tuple[StepResult, list[Failure]]:
    """The step's result for the chunks that work, and the failure of each that does not."""
    try:
        return runner.execute(output), []
    except EngineFatalError:  # the engine itself is broken (a lost rank): no one to blame
        raise
    except Exception as exc:
        error = exc
    _check_device(runner, error)
    if len(output.chunks) <= 1:
        return StepResult(), [(c.request.request_id, error) for c in output.chunks]
    logger.warning(
        "a step of %d requests failed (%s); running them one at a time to find the cause",
        len(output.chunks),
        type(error).__name__,
    )
    merged = StepResult()
    failures: list[Failure] = []
    copies = output.blocks_to_copy
    for chunk in output.chunks:
        try:
            result = runner.execute(SchedulerOutput((chunk,), copies, ()))
        except EngineFatalError:
            raise
        except Exception as exc:
            failures.append((chunk.request.request_id, exc))
            _check_device(runner, exc)
            continue
        copies = ()  # done once
        merged.sampled.update(result.sampled)
        merged.prompt_scores.update(result.prompt_scores)
        merged = StepResult(
            merged.sampled, merged.prompt_scores, merged.unsampleable + result.unsampleable
        )
    return merged, failures


def _check_device(runner: ModelRunner, cause: BaseException) -> None:
    try:
        runner.backend.synchronize()
    except Exception as exc:
        raise EngineFatalError(
            f"the {runner.backend.name} device stopped working ({type(exc).__name__}) after a "
            f"step failed with {type(cause).__name__}"
        ) from exc
