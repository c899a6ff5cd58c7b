"""serve(settings): run the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

On the first signal the server stops taking requests (/health and new generations answer 503),
lets running requests finish for up to `drain_timeout_s`, aborts the rest, then lets uvicorn
close the connections and returns (exit status 0). A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState, Status

logger = logging.getLogger("scheinfer.server")

_FLUSH_S = 0.2  # after the drain, time for the last chunks of aborted streams to go out
_GRACEFUL_SHUTDOWN_S = 5.0  # uvicorn's bound on closing connections after the drain


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals drain the engine before shutting down."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after serving (exit 143).
        if self._draining or self._loop is None or not self.started:
            self.should_exit = True
            return
        self._draining = True
        logger.info("signal %d: draining (up to %.0fs)", sig, self.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            if self.state.status is Status.READY:
                self.state.status = Status.DRAINING
            engine = self.state.engine
            if engine is not None:
                finished = await asyncio.to_thread(engine.drain, self.drain_timeout_s)
                logger.info("drain %s", "complete" if finished else "timed out: aborted the rest")
                await asyncio.sleep(_FLUSH_S)
        except Exception:
            logger.exception("drain failed")
        finally:
            self.should_exit = True


def serve(settings: ServerSettings) -> int:
    """Run the server until a signal; returns 0 after a graceful shutdown."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(_GRACEFUL_SHUTDOWN_S),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.scheinfer, settings.drain_timeout_s)
    server.run(sockets=[listening_socket(settings.host, settings.port)])
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, with TCP_NODELAY (inherited by accepted connections on Linux): without
    it a streamed response's first small write waits for the client's delayed ACK (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
