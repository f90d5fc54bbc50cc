"""The RPC front end in a process of its own, joined to the engine loop by a pipe.

Per-token RPC work (gRPC writes, protobuf, asyncio) then never holds the engine process's GIL: the
engine thread only pickles one message per step. The engine process keeps the scheduler, the engine
and the Prometheus metrics; the front end keeps the gRPC server (orch.v1, KServe v2, health,
reflection), request validation, tokenization, detokenization and stop strings.

Messages, pickled tuples over one duplex multiprocessing pipe:
  front end -> engine: ("ready", port) or ("error", message) once, at start-up; then ("batch", [msg...])
                       once per turn of its event loop, each msg ("add", seq_id, GenerationRequest),
                       ("abort", seq_id, completed) or ("rejected",)
  engine -> front end: ("out", [(seq_id, packed SeqOutput | RequestError)...]) once per step,
                       ("health", ok), ("stop", grace_s)
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

from workers.scheduler import SeqOutput
from workers.serving import EngineLoop, GenerationRequest, ModelInfo, RequestError, Sink

def send_locked(conn: Connection, lock: threading.Lock, msg: tuple) -> bool:
    """Send msg over the pipe (one sender at a time); False when the other process is gone."""
    try:
        with lock:
            conn.send(msg)
        return True
    except (OSError, ValueError):
        return False


def pack(o: SeqOutput) -> tuple:
    """A SeqOutput as a plain tuple (pickles several times faster than the dataclass)."""
    return (o.token_ids, o.text, o.logprobs, o.finished, o.finish_reason, o.stop_reason, o.num_prompt_tokens,
            o.num_output_tokens, o.num_cached_tokens)


def unpack(seq_id: int, t: tuple) -> SeqOutput:
    """Inverse of pack."""
    return SeqOutput(seq_id, *t)


# --- engine process ------------------------------------------------------------------------------------


class EngineBridge:
    """Engine-process end of the pipe: feeds the front end's requests to the loop, sends each step's outputs."""

    def __init__(self, loop: EngineLoop, conn: Connection) -> None:
        self.loop, self.conn = loop, conn
        self._pending: list[tuple[int, Any]] = []  # filled and sent by the engine thread only
        self._healthy = loop.healthy
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="frontend-bridge", daemon=True)
        loop.flush_hooks.append(self.flush)

    def start(self) -> None:
        self._reader.start()

    def _sink(self, seq_id: int) -> Sink:
        def sink(item: Any) -> None:
            if isinstance(item, SeqOutput):
                self._pending.append((seq_id, pack(item)))
            else:
                err = item if isinstance(item, RequestError) else RequestError("INTERNAL", f"engine failed: {item}")
                self._pending.append((seq_id, err))
        return sink

    def _read(self) -> None:
        live: set[int] = set()
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            for op, *args in msg[1]:   # ("batch", [...]): all the front end sends after start-up
                if op == "add":
                    live.add(args[0])
                    self.loop.submit(args[1], self._sink(args[0]), seq_id=args[0])
                elif op == "abort":
                    live.discard(args[0])
                    self.loop.abort(*args)
                elif op == "rejected":
                    self.loop.count_rejected()
        for seq_id in live:  # the front end is gone: nobody reads these any more
            self.loop.abort(seq_id)

    def flush(self) -> None:
        """Engine thread, after each round of sink calls: one message for the whole step."""
        if self.loop.healthy != self._healthy:
            self._healthy = self.loop.healthy
            self.send(("health", self._healthy))
        if self._pending:
            batch, self._pending = self._pending, []
            self.send(("out", batch))

    def send(self, msg: tuple) -> None:
        send_locked(self.conn, self._send_lock, msg)   # False: the front end is gone, nothing to tell


# --- front-end process ---------------------------------------------------------------------------------


class EngineClient:
    """Front-end end of the pipe, with the EngineLoop interface that Serving uses."""

    def __init__(self, conn: Connection, on_stop: Callable[[float], None]) -> None:
        self.conn = conn
        self.on_stop = on_stop
        self.healthy = True
        self.flush_hooks: list[Callable[[], None]] = []
        self._sinks: dict[int, Sink] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._outbox: list[tuple] = []
        self._outbox_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="engine-client", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def submit(self, req: GenerationRequest, sink: Sink) -> int:
        seq_id = next(self._ids)
        self._sinks[seq_id] = sink
        self._queue(("add", seq_id, req))
        return seq_id

    def abort(self, seq_id: int, completed: bool = False) -> None:
        if self._sinks.pop(seq_id, None) is not None:
            self._queue(("abort", seq_id, completed))

    def count_rejected(self) -> None:
        self._queue(("rejected",))

    def _queue(self, msg: tuple) -> None:
        """Event-loop thread: what one turn of the loop asks of the engine goes in one pipe message, so that
        the engine process's reader thread takes its GIL once per turn rather than once per request."""
        with self._outbox_lock:    # also called from executor threads (a long prompt's rejection)
            self._outbox.append(msg)
            first = len(self._outbox) == 1
        if first:
            try:
                asyncio.get_running_loop().call_soon(self._send_outbox)
            except RuntimeError:   # not on an event loop (e.g. a worker thread): send now
                self._send_outbox()

    def _send_outbox(self) -> None:
        with self._outbox_lock:
            msgs, self._outbox = self._outbox, []
        if msgs and not send_locked(self.conn, self._send_lock, ("batch", msgs)):
            self.healthy = False

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "out":
                for seq_id, item in msg[1]:
                    if isinstance(item, BaseException):
                        sink = self._sinks.pop(seq_id, None)
                    else:
                        item = unpack(seq_id, item)
                        sink = self._sinks.pop(seq_id, None) if item.finished else self._sinks.get(seq_id)
                    if sink is not None:
                        sink(item)
                self._flush()
            elif msg[0] == "health":
                self.healthy = msg[1]
            elif msg[0] == "stop":
                self.on_stop(msg[1])
                return
        self.healthy = False  # the engine process is gone
        err = RequestError("UNAVAILABLE", "the engine process is gone")
        for sink in list(self._sinks.values()):
            sink(err)
        self._sinks.clear()
        self._flush()
        self.on_stop(0.0)

    def _flush(self) -> None:
        for hook in self.flush_hooks:
            hook()


def frontend_main(cfg: Any, info: ModelInfo, conn: Connection) -> None:
    """Entry point of the front-end process: serve gRPC until the engine says stop or goes away."""
    import signal

    from workers.server import Frontend, load_tokenizer

    # Ctrl-C reaches the whole process group: the engine process handles it and stops this one
    # through the pipe (an interrupted front end would only print tracebacks).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stopped = asyncio.Event()
        aio = asyncio.get_running_loop()
        grace = [2.0]

        def on_stop(g: float) -> None:
            grace[0] = g
            aio.call_soon_threadsafe(stopped.set)

        client = EngineClient(conn, on_stop)
        front = Frontend(cfg, info, client, load_tokenizer(cfg))
        try:
            await front.start()
        except Exception as e:  # noqa: BLE001 - reported to the engine process, which raises it
            conn.send(("error", str(e)))
            return
        conn.send(("ready", front.port))
        client.start()
        await stopped.wait()
        await front.stop(grace[0])

    try:
        asyncio.run(main())
    finally:
        conn.close()
