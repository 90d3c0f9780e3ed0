"""Running the server: load the model, build the engine and app, listen, serve until Ctrl-C / SIGTERM.

The socket is bound here (so a taken port is one clear error and `--port 0` picks a free one to report) and
handed to uvicorn. On the first SIGINT or SIGTERM uvicorn stops accepting connections and waits up to
`drain_timeout` seconds for the requests in flight to finish; then the app's lifespan stops the engine and the
process exits with status 0 (a second Ctrl-C forces the exit).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from ..errors import CheckpointError, ConfigError
from .app import create_app
from .engine import Engine
from .settings import ServeSettings

log = logging.getLogger("sparsecraft.serve")


def context_length(model, tokenizer, asked: int | None) -> int:
    """The context window: `asked`, else the model config's `max_position_embeddings` (else the tokenizer's
    `model_max_length`, else 2048). Asking for more than the model's own window is an error."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    own = getattr(config, "max_position_embeddings", None)
    if asked is not None:
        if own is not None and asked > own:
            raise ConfigError(f"--max-model-len {asked} exceeds the model's max_position_embeddings {own}")
        return asked
    if own is not None:
        return int(own)
    from_tokenizer = getattr(tokenizer, "model_max_length", None)
    return int(from_tokenizer) if from_tokenizer and from_tokenizer < 1_000_000 else 2048


def load_engine(settings: ServeSettings) -> tuple[Engine, int]:
    """Load the model and tokenizer `settings.model` names; returns the engine and the context length."""
    import torch

    from ..generation import load_tokenizer_for
    from ..loading import load

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load(settings.model, dtype=settings.dtype, device=settings.device, allow_pickle=settings.allow_pickle)
    tokenizer = load_tokenizer_for(settings.model, model)
    if settings.compile:
        from ..moe.compiled import compile_moe_blocks, compile_note

        note = compile_note(compile_moe_blocks(model))
        if note:
            log.warning(note)
    engine = Engine(model, tokenizer, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                    max_prefill_tokens=settings.max_prefill_tokens)
    return engine, context_length(model, tokenizer, settings.max_model_len)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); `ConfigError` when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a signal that led to a completed graceful drain is not raised again
    afterwards, so the process exits with 0 instead of dying of the signal."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and not self.force_exit:
            captured.clear()


@dataclass
class Prepared:
    """A server ready to run: `server.run(sockets=[sock])` blocks until it stops."""

    server: DrainingServer
    sock: socket.socket
    url: str
    engine: Engine

    def run(self) -> None:
        self.server.run(sockets=[self.sock])


def prepare(settings: ServeSettings, engine: Engine | None = None, context: int | None = None) -> Prepared:
    """Load (unless an engine is given), bind and configure; nothing is served until `run`."""
    settings.validate()
    if engine is None:
        engine, context = load_engine(settings)
    if context is None:
        raise CheckpointError("an engine was given without its context length")
    app = create_app(engine, model_name=settings.model_name, context=context, max_body_bytes=settings.max_body_bytes)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=settings.drain_timeout,
                            access_log=settings.log_level == "debug", lifespan="on")
    display = f"[{host}]" if ":" in host else host
    return Prepared(DrainingServer(config), sock, f"http://{display}:{port}", engine)


def serve(settings: ServeSettings, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until stopped; `on_ready(url)` is called once the socket listens. Returns 0 after a clean drain."""
    prepared = prepare(settings)
    if on_ready is not None:
        on_ready(prepared.url)
    prepared.run()
    return 0
