"""``crossinfer serve``: load a model and serve it over HTTP with uvicorn.

The flags are added without importing the server, so ``crossinfer --help`` stays cheap; the
device is resolved before the model is opened, so a missing accelerator fails in seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING

from crossinfer.server.limits import add_limit_arguments, limits_from_args

if TYPE_CHECKING:
    from crossinfer.engine.frontend import EngineClient
    from crossinfer.engine.setup import EngineConfig

# The embedded default model's public name (the GGUF file name carries the quantisation).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "CROSSINFER_API_KEY"

logger = logging.getLogger("crossinfer")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags (the engine and ``--device`` flags are added by the caller)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default: --model, or {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=512,
        help="sequences that may wait for admission before requests get 503 (default 512)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body accepted; larger ones get 413 (default 1 MiB)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    parser.add_argument(
        "--no-engine-process",
        dest="engine_process",
        action="store_false",
        help="run the engine's step loop on a thread of the server's process instead of an "
        "engine-core process of its own (one process; for debugging)",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        type=_lora_module,
        metavar="NAME=PATH",
        help="LoRA adapters served from the start (PEFT folders), as NAME=PATH or JSON "
        '{"name": ..., "path": ...}; a request names one as its model (needs --enable-lora)',
    )
    add_limit_arguments(parser)


def _lora_module(text: str) -> tuple[str, str]:
    from crossinfer.server.adapters import parse_lora_module

    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Resolve the device, load the model, then serve until interrupted (0), or until the
    engine breaks (1: the server drains its connections and exits, so that a supervisor can
    restart it)."""
    import uvicorn

    from crossinfer.engine.core_client import EngineStartError
    from crossinfer.engine.launched import launched_ranks, run_rank
    from crossinfer.engine_args import engine_config_from_args
    from crossinfer.registry import resolve_device
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    launched = launched_ranks()
    if launched is not None and launched[0] != 0:  # torchrun's other ranks: workers, no HTTP
        logger.info("rank %d of %d: serving rank 0's calls", *launched)
        return run_rank(config, *launched)
    # The device first: a missing one fails in seconds, before a process or a model is started.
    config = replace(config, device=resolve_device(config.device).name)
    try:
        engine, model_path = _start_engine(config, args)
    except EngineStartError as exc:
        logger.error("the engine did not start: %s", exc)
        return 1
    settings = ServerSettings(
        served_model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
        model_path=model_path,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        limits=limits_from_args(args),
        lora_modules=tuple(args.lora_modules),
    )
    logger.info(
        "serving %s (max_model_len %d) on http://%s:%d%s",
        settings.served_model_name,
        engine.max_model_len,
        args.host,
        args.port,
        " with an API key" if settings.api_key else "",
    )
    app = build_app(engine, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level.lower(),
            timeout_graceful_shutdown=30,
        )
    )
    broken: list[BaseException] = []

    def on_engine_stop(error: BaseException) -> None:  # on the engine thread
        logger.critical("the engine broke (%s); draining and exiting", engine.stop_reason)
        broken.append(error)
        server.should_exit = True  # read by uvicorn's main loop

    engine.on_stop = on_engine_stop
    engine.start()  # now, not at the first request: it watches the tensor-parallel ranks
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has drained; it re-raises the signal after
        pass
    finally:
        engine.shutdown()
    return 1 if broken else 0


def _start_engine(config: EngineConfig, args: argparse.Namespace) -> tuple[EngineClient, str]:
    """The engine in a process of its own (the default), or on a thread of this one; with
    the path of the model it loaded."""
    from crossinfer.engine.async_engine import AsyncLLMEngine
    from crossinfer.engine.core_client import ProcessEngine
    from crossinfer.engine.setup import load_model

    if args.engine_process:
        engine = ProcessEngine.launch(config, args.max_waiting, args.log_level)
        return engine, engine.info.model_path
    loaded = load_model(config)
    return AsyncLLMEngine.from_config(config, loaded, args.max_waiting), loaded.model_files.path
