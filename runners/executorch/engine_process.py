"""The local model's own process: it loads the ExecuTorch program and runs
every forward step, so the web process never waits for one.

Why a process of its own: ExecuTorch's `Method.execute` keeps the GIL for a
whole forward step (docs/executorch.md, measured). Run in the web process, a
decoding answer let that process's event loop, and so every other socket it
serves, run only between steps. Here the steps hold this process's GIL
instead; the web process only turns token ids into text. It also keeps a
crash in native code (a kernel, a broken program) away from the web server:
the answers in flight fail with a clear error and the next request starts a
new process.

One engine process per slot (one KV cache) of a loaded model, per web
process: runner.py's `_Engine` starts as many as the runner's `parallelism`.
Two slots in one process would take turns on its GIL just as the web process
did (two answers at once no faster than one, measured); in processes of their
own they decode side by side.

Messages are pickled tuples over a socket pair (`multiprocessing.connection`);
the first item is the kind, the second a request id. From the web process:

- `("load", id, pte, threads)`: load the program (once) with a threadpool of
  `threads` (0: ExecuTorch's default); answered `("ok", id, {metadata,
  seconds, threads, switch_interval, pid})`.
- `("generate", id, prompt, params, vocab_size, max_new, reuse, eos, chunk)`:
  prefill what the KV cache does not hold, then sample token by token;
  answered `("prefilled", id, started, prefilled_at, reused, computed)`,
  `("tokens", id, [token, ...])` as they come, then `("end", id, ended,
  generated, cached)`. The first FIRST_TOKENS_AT_ONCE tokens are sent one by
  one; after them the tokens of up to SEND_INTERVAL_S go in one message, so the
  web process's reader thread wakes ~65 times a second, not once per token.
- `("greedy", id, prompt, along, steps, eos, chunk)`: the top-1 token at
  each step (evaluate.py); answered `("ok", id, tokens)`.
- `("cancel", id)`: stop that generation before its next token.
- `("exit",)`: take no new work, finish what runs, then close.

Any request may end with `("error", id, message)` instead. End of input (the
web process closed its end or died) cancels everything and exits. The web
process sends one generation at a time (its slot pool sees to that).

This module imports no Django: it runs as `python -m
runners.executorch.engine_process FD`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from runners.executorch.sampling import Sampler, argmax

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# Messages that end a request (its handler is then forgotten).
FINAL = frozenset({"ok", "end", "error"})
# The GIL hand-over interval in the engine process. Besides the generation
# thread it runs one thread that reads requests: at
# Python's default 5 ms a cancel could wait that long per forward step.
SWITCH_INTERVAL_S = 0.001
# Tokens leave at most this often once the first few are out (the end and an
# error at once): a message per token woke the web process's reader thread
# ~180 times a second, each time taking a core from this process's threadpool
# on a 2-core machine (docs/benchmarks.md, measured).
SEND_INTERVAL_S = 0.015
FIRST_TOKENS_AT_ONCE = 4  # sent one by one: the time to first text


class EngineStopped(RuntimeError):
    """The engine process is gone (or was never reachable)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


# ---- the web process's side ----------------------------------------------------------


class EngineProcess:
    """The web process's handle on one engine process (thread-safe)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        # The socket itself stays ours to shut down: closing a descriptor does
        # not wake the reader thread blocked in recv() on it, a shutdown does.
        self._socket = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._handlers: dict[int, Callable[[tuple], None]] = {}
        self._handlers_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.stopped = ""  # why it is gone, once it is
        self._reader = threading.Thread(
            target=self._read, name="executorch-engine-reader", daemon=True
        )
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self.stopped

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, kind: str, handler: Callable[[tuple], None], *args: Any) -> int:
        """Send request `kind`; `handler` gets each of its answers (on the
        reader thread, in order). Returns the request's id."""
        request_id = next(self._ids)
        with self._handlers_lock:
            if self.stopped:
                raise EngineStopped(self.stopped)
            self._handlers[request_id] = handler
        try:
            self._send((kind, request_id, *args))
        except EngineStopped:
            with self._handlers_lock:
                self._handlers.pop(request_id, None)
            raise
        return request_id

    def call(self, kind: str, *args: Any) -> concurrent.futures.Future:
        """Send request `kind`; the future holds its `ok` answer's value (or
        raises EngineStopped with its error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def answered(message: tuple) -> None:
            if message[0] == "ok":
                future.set_result(message[2])
            elif message[0] == "error":
                future.set_exception(EngineStopped(message[2]))

        self.start(kind, answered, *args)
        return future

    def cancel(self, request_id: int) -> None:
        with contextlib.suppress(EngineStopped):
            self._send(("cancel", request_id))

    def retire(self) -> None:
        """Take no new work; the process exits once what runs has finished."""
        with contextlib.suppress(EngineStopped):
            self._send(("exit",))

    def close(self, timeout: float = 5.0) -> None:
        """Stop now: what runs ends with an error."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout)

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # ValueError: closed by close()
            gone = self.stopped or f"The local model's process is gone ({exc})."
            raise EngineStopped(gone) from None

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: closed under recv()
                break
            with self._handlers_lock:
                if message[0] in FINAL:
                    handler = self._handlers.pop(message[1], None)
                else:
                    handler = self._handlers.get(message[1])
            if handler is not None:
                try:
                    handler(message)
                except Exception:
                    # One request's failure must not stop the answers of the others.
                    log.exception("handling the engine process's %r failed", message[0])
        try:
            code = self._process.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        with self._handlers_lock:
            self.stopped = f"The local model's process stopped (exit status {code})."
            pending, self._handlers = self._handlers, {}
        for request_id, handler in pending.items():
            handler(("error", request_id, self.stopped))
        with contextlib.suppress(OSError):
            self._conn.close()
        self._socket.close()


# ---- the engine process's side --------------------------------------------------------


class _Slot:
    """One forward method (one KV cache) and the tokens its cache holds,
    positions 0..len(cached)-1: the next token fed goes to len(cached)."""

    def __init__(self, method: Any, prefill_threads: int) -> None:
        self.method = method
        self.prefill_threads = prefill_threads
        self.cached: list[int] = []
        self._inputs: tuple[Any, Any] | None = None  # one decode step's (token, position)

    def prefill(self, tokens: list[int], chunk: int, cancelled: Any = None) -> Any:
        """Feed `tokens` after what the cache holds, in calls of at most
        `chunk` tokens (stopping early once `cancelled` is set); the last
        call's logits, None if none ran.

        The calling thread's torch ops run on one thread (see `generate`),
        except here: a prompt's forward calls also use torch's intra-op
        threads (measured: a 62-token prefill 12-23 ms faster with them),
        as many as the program's own threadpool has (torch's default when
        that is ExecuTorch's default)."""
        import torch

        logits = None
        torch.set_num_threads(self.prefill_threads)
        try:
            for start in range(0, len(tokens), chunk):
                if cancelled is not None and cancelled.is_set():
                    break
                part = tokens[start : start + chunk]
                position = len(self.cached)
                logits = self.method.execute([torch.tensor([part]), torch.tensor([position])])[0]
                self.cached.extend(part)
        finally:
            torch.set_num_threads(1)
        return logits

    def step(self, token: int) -> Any:
        """Feed one token after what the cache holds; its logits."""
        if self._inputs is None:
            import torch

            self._inputs = (
                torch.zeros((1, 1), dtype=torch.long),
                torch.zeros((1,), dtype=torch.long),
            )
        token_in, position_in = self._inputs
        token_in[0, 0] = token
        position_in[0] = len(self.cached)
        logits = self.method.execute([token_in, position_in])[0]
        self.cached.append(token)
        return logits


class _Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.send_lock = threading.Lock()
        self.load_lock = threading.Lock()
        self.slot: _Slot | None = None
        self.metadata: dict[str, Any] = {}
        self.cancels: dict[int, threading.Event] = {}
        self.threads: set[threading.Thread] = set()
        self.gone = False

    def send(self, *message: Any) -> None:
        if self.gone:
            return
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:
            # The web process is gone: nobody listens, stop everything.
            self.gone = True
            for event in list(self.cancels.values()):
                event.set()

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.gone = True
                break
            kind = message[0]
            if kind == "exit":
                # Keep reading (a cancel may still come) until what runs has
                # finished; then the connection is shut down and recv() ends.
                threading.Thread(target=self._finish_then_close, daemon=True).start()
                continue
            if kind == "cancel":
                event = self.cancels.get(message[1])
                if event is not None:
                    event.set()
                continue
            target = {"load": self.load, "generate": self.generate, "greedy": self.greedy}[kind]
            if kind == "generate":
                self.cancels[message[1]] = threading.Event()
            thread = threading.Thread(target=self._run, args=(target, message), daemon=True)
            self.threads.add(thread)
            thread.start()
        if self.gone:
            for event in list(self.cancels.values()):
                event.set()
        for thread in list(self.threads):
            thread.join()

    def _finish_then_close(self) -> None:
        for thread in list(self.threads):
            thread.join()
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    def _run(self, target: Callable[..., None], message: tuple) -> None:
        request_id = message[1]
        try:
            target(request_id, *message[2:])
        except BaseException as exc:
            self.send("error", request_id, str(exc) or type(exc).__name__)
        finally:
            self.cancels.pop(request_id, None)
            self.threads.discard(threading.current_thread())

    def load(self, request_id: int, pte: str, threads: int) -> None:
        with self.load_lock:
            started = time.monotonic()
            if self.slot is None:
                import torch

                program = _load_program(pte, threads)
                self.metadata = _program_metadata(program)
                method = program.load_method("forward")
                self.slot = _Slot(method, threads or torch.get_num_threads())
            self.send(
                "ok",
                request_id,
                {
                    "metadata": self.metadata,
                    "seconds": time.monotonic() - started,
                    "threads": _thread_count(),
                    "switch_interval": sys.getswitchinterval(),
                    "pid": os.getpid(),
                },
            )

    def _loaded(self) -> _Slot:
        if self.slot is None:
            raise RuntimeError("no program is loaded")
        return self.slot

    def generate(
        self,
        request_id: int,
        prompt: list[int],
        params: Any,
        vocab_size: int,
        max_new: int,
        reuse: bool,
        eos: frozenset[int],
        chunk: int,
    ) -> None:
        """Prefill what the KV cache does not already hold, then
        generate token by token until an end token, `max_new` tokens or a
        cancel."""
        import torch

        # Sampling runs small torch ops per token. With OpenMP this setting is
        # per thread: this thread's ops stay on it (waking a second OpenMP
        # thread for a 49k-element copy cost milliseconds per token on a busy
        # machine); the program runs on ExecuTorch's own threadpool. The
        # prompt's forward calls are the exception (`_Slot.prefill`).
        torch.set_num_threads(1)
        started = time.perf_counter()
        cancelled = self.cancels[request_id]
        slot = self._loaded()
        generated = 0
        pending: list[int] = []  # tokens made and not yet sent
        try:
            sampler = Sampler(params, vocab_size)
            # Keep the cached prefix (at least one prompt token must be
            # computed to get logits); positions after it are overwritten.
            keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1) if reuse else 0
            del slot.cached[keep:]
            logits = slot.prefill(prompt[keep:], chunk, cancelled)
            computed = len(slot.cached) - keep
            self.send("prefilled", request_id, started, time.perf_counter(), keep, computed)
            sent_at = float("-inf")
            while logits is not None and not cancelled.is_set():
                token = sampler.pick(logits)
                generated += 1
                pending.append(token)
                last = token in eos or generated >= max_new
                now = time.perf_counter()
                if last or generated <= FIRST_TOKENS_AT_ONCE or now - sent_at >= SEND_INTERVAL_S:
                    self.send("tokens", request_id, pending)
                    pending, sent_at = [], now
                if last:
                    break
                sampler.accept(token)
                logits = slot.step(token)
        except BaseException:
            slot.cached.clear()  # the cache's content is unknown now
            raise
        finally:
            if pending:  # cancelled or failed after them: what was made still goes out
                self.send("tokens", request_id, pending)
        self.send("end", request_id, time.perf_counter(), generated, slot.cached)

    def greedy(
        self,
        request_id: int,
        prompt: list[int],
        along: Sequence[int] | None,
        steps: int,
        eos: frozenset[int],
        chunk: int,
    ) -> None:
        """The top-1 token at each step, from the raw logits, the prompt
        prefilled in full; with `along`, each step is fed along's token."""
        import torch

        torch.set_num_threads(1)  # as in generate
        slot = self._loaded()
        slot.cached.clear()  # overwritten from position 0
        chosen: list[int] = []
        try:
            logits = slot.prefill(prompt, chunk)
            while logits is not None and len(chosen) < steps:
                top = argmax(logits)
                chosen.append(top)
                if len(chosen) == steps or (along is None and top in eos):
                    break
                logits = slot.step(along[len(chosen) - 1] if along is not None else top)
        finally:
            # Nothing is kept for reuse (the web process's copy of the cache
            # is empty too).
            slot.cached.clear()
        self.send("ok", request_id, chosen)


_native_ops_loaded = False


def _load_program(pte: str, threads: int) -> Any:
    global _native_ops_loaded
    if not _native_ops_loaded:
        # Register the custom SDPA / KV-cache and quantized-embedding kernels
        # the exported program calls; without them loading fails with
        # "Missing operator llama::custom_sdpa.out" / "embedding_byte".
        import executorch.extension.llm.custom_ops.custom_ops
        import executorch.kernels.quantized  # noqa: F401 (registers kernels)

        _set_threads(threads)
        _native_ops_loaded = True
    from executorch.runtime import Runtime

    return Runtime.get().load_program(pte)


def _set_threads(threads: int) -> None:
    """Size ExecuTorch's one threadpool (0: leave its default, one per core).
    Only before the first program is loaded: resizing it while a program may
    run is unsafe. With two threads a quantized program's results vary in
    their last bits from run to run on some CPUs (docs/executorch.md); with
    one they repeat exactly on any."""
    if not threads:
        return
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def _thread_count() -> int:
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


def _program_metadata(program: Any) -> dict[str, Any]:
    """The constant methods export_llama adds (get_vocab_size, get_eos_ids...)."""
    meta: dict[str, Any] = {}
    for name in program.method_names:
        if not name.startswith("get_"):
            continue
        with contextlib.suppress(Exception):
            values = [int(v) for v in program.load_method(name).execute([])]
            meta[name] = values if name == "get_eos_ids" else values[0]
    return meta


def main(fd: int) -> None:
    # Ctrl-C in `make run` reaches the whole process group: the web process
    # decides when this one ends (by closing its end of the socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    conn = Connection(fd)
    try:
        _Worker(conn).serve()
    finally:
        with contextlib.suppress(OSError):
            conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
