"""A server in a child process (spawned, so the parent's threads and torch state stay its own): the load benchmark
starts one per model, and stops it the way an operator would, with SIGTERM."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass

from .settings import ServeSettings


def _watch_parent(parent: int) -> None:
    """Stop (drain, exit) when the parent is gone, so a killed benchmark leaves no server behind."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(settings: ServeSettings, conn, parent: int) -> None:
    from .server import serve

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        serve(settings, on_ready=lambda url: conn.send(("ready", url)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


@dataclass
class ServerProcess:
    """A running server: its base URL (`http://host:port`) and the child process."""

    url: str
    model_name: str
    process: mp.process.BaseProcess

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (drain, then exit); kill if it has not exited within `timeout`. Returns the exit code."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode


def start_server_process(settings: ServeSettings, timeout: float = 600.0) -> ServerProcess:
    """Spawn a server for `settings` (port 0 picks a free one) and wait until it listens; RuntimeError with the
    child's one-line reason when it does not come up."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(settings, child, os.getpid()), name="sparsecraft-serve", daemon=True)
    process.start()
    child.close()
    if not parent.poll(timeout):
        process.kill()
        raise RuntimeError(f"the server for {settings.model} did not start within {timeout:.0f} s")
    try:
        kind, value = parent.recv()
    except EOFError:
        kind, value = "error", f"the server process exited with {process.exitcode}"
    if kind != "ready":
        process.join(10)
        raise RuntimeError(f"the server for {settings.model} failed: {value}")
    return ServerProcess(value, settings.model_name, process)
