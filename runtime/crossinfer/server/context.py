"""What every route needs: the engine, the settings, the limits, the metrics, the prompt and
parameter builders, and the shared steps of handling a generation request (model check,
submission, waiting with disconnect detection)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from crossinfer.engine.errors import RequestError, RequestFailedError
from crossinfer.engine.frontend import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    GenerateRequest,
)
from crossinfer.engine.output_stream import OutputStream
from crossinfer.engine.outputs import RequestOutput
from crossinfer.lora.request import LoRARequest
from crossinfer.server.adapters import ServedAdapters
from crossinfer.server.errors import APIError, bad_request, stream_error
from crossinfer.server.limits import ServerLimits
from crossinfer.server.metrics import ServerMetrics
from crossinfer.server.params import ParamsBuilder
from crossinfer.server.prompts import PromptService


@dataclass(frozen=True)
class ServerSettings:
    """How the server presents itself and guards its door."""

    served_model_name: str
    model_path: str | None = None  # shown as the model card's ``root``
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # the Retry-After of a 429 / 503 when the server is full
    limits: ServerLimits = ServerLimits()
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, folder): adapters served at start


class ClientDisconnected(Exception):
    """The client went away while a non-streaming request was generating."""


@dataclass(frozen=True)
class ServerContext:
    """Passed to each router factory; routes close over it (no global state)."""

    engine: EngineClient
    settings: ServerSettings
    limits: ServerLimits  # resolved against the model
    metrics: ServerMetrics
    params: ParamsBuilder
    prompts: PromptService
    created: int  # when the server started (the model card's ``created``)
    adapters: ServedAdapters  # the LoRA adapters served by name

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None, param: str = "model") -> LoRARequest | None:
        """The adapter ``model`` names, None for the served model (or absent); 404 for any
        other name."""
        if model is None or model == self.settings.served_model_name:
            return None
        lora = self.adapters.get(model)
        if lora is None:
            names = [self.settings.served_model_name] + [a.lora_name for a in self.adapters.all()]
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves "
                f"{', '.join(map(repr, names))}",
                param=param,
                code="model_not_found",
            )
        return lora

    async def load_adapter(self, name: str, path: str) -> LoRARequest:
        """Have the engine read and check an adapter folder, then serve it as ``name``; 400
        with the engine's reason when the folder cannot run on this model."""
        lora = self.adapters.new(name, path)
        try:
            await self.engine.add_lora(lora)
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_path", code="invalid_value") from exc
        self.adapters.add(lora)
        return lora

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    async def submit(
        self, requests: Sequence[GenerateRequest], param_names: dict[str, str] | None = None
    ) -> OutputStream:
        """Add the requests together; returns their output stream. Refusals become 400
        (naming the parameter), or 503 with Retry-After when full."""
        try:
            stream = await self.engine.add_requests(requests, self.metrics.timer())
        except EngineOverloadedError as exc:
            retry = str(self.settings.retry_after_s)
            raise APIError(
                503, str(exc), code="server_overloaded", headers={"Retry-After": retry}
            ) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from exc
        except ValueError as exc:
            raise bad_request(exc, param_names) from exc
        except RequestError as exc:  # failed inside the engine while adding: logged there
            raise APIError(500, str(exc), code="internal_error") from exc
        return stream

    async def collect(self, stream: OutputStream, request: Request) -> list[RequestOutput]:
        """The final output of each of the stream's requests, in order. If the client
        disconnects first, the requests are aborted and ClientDisconnected is raised."""
        final: dict[str, RequestOutput] = {}

        async def consume() -> None:
            async for output in stream:
                if output.finished:
                    final[output.request_id] = output

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise ClientDisconnected
            work.result()  # raises what the engine raised
        except (RequestFailedError, EngineDeadError) as exc:
            raise stream_error(exc) from exc
        finally:
            gone.cancel()
            work.cancel()
            stream.close()
        return [final[i] for i in stream.request_ids]


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect (uvicorn sends
    # it when the client closes the connection, or after the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def now() -> int:
    """Unix time in seconds, for the responses' ``created``."""
    return int(time.time())
