"""The line protocol between the benchmark parent and its child processes.

Every server and client runs in its own process, started as
``python -m bench.worker '<json spec>'``.  They talk to the parent over their
standard streams, one JSON object per line:

* child -> parent (stdout): ``{"event": "ready", ...}``, ``{"event": "result", ...}``,
  ``{"event": "rss", ...}``.  A child never prints anything else on stdout;
  libraries' chatter goes to stderr, whose tail the parent keeps for error
  messages.
* parent -> child (stdin): bare command words (``go``, ``rss``, ``big``...).

EOF on a child's stdin means "the parent is gone or done with you": a
watchdog thread then ends the child at once with ``os._exit``, so no child
outlives the parent, even one that was SIGKILLed.  The parent side also kills
every child it started on exit (``ChildSet`` and an ``atexit`` hook).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, final

# The one address every benchmark process binds to and connects to.  Nothing
# in the harness may use another: it must only ever talk to this machine.
HOST = "127.0.0.1"

# The repository root: children run with it as their working directory so
# that ``python -m bench.worker`` (and an in-place built ``malla``) import.
REPO_ROOT = Path(__file__).resolve().parent.parent

_STDERR_TAIL_LINES = 20


class ChildError(RuntimeError):
    """A child process failed, timed out or said something unexpected."""


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------


def peak_rss_kib() -> int:
    """This process's own peak RSS in KiB.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is the portable figure, but on Linux
    exec carries the pre-exec peak over: a child started by a Python parent
    reports at least the parent's RSS (a 10 MiB child of a 200 MiB parent
    says 200 MiB).  /proc/self/status's VmHWM is the peak of this program's
    own address space only, so it is used where it exists.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int | None:
    """This process's RSS right now, in KiB, or None where /proc is missing.

    Memory-growth figures need the current RSS, not the peak: the peak never
    goes down, so it cannot show what stays allocated after a burst.
    """
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


class Control:
    """The child's end of the protocol: emit events, wait for commands."""

    def __init__(self) -> None:
        self._out_lock = threading.Lock()
        self._commands: queue.Queue[str] = queue.Queue()
        # stdout carries only protocol lines; anything a library prints there
        # would corrupt them, so the real stream is kept private and
        # sys.stdout is pointed at stderr.
        self._out: IO[str] = sys.stdout
        sys.stdout = sys.stderr
        threading.Thread(target=self._read_stdin, name="bench-control", daemon=True).start()

    def emit(self, event: str, **fields: Any) -> None:
        """Send one event line to the parent (thread-safe)."""
        line = json.dumps({"event": event, **fields})
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def emit_rss(self) -> None:
        """Answer the parent's ``rss`` command (safe from any thread)."""
        self.emit("rss", peak_kib=peak_rss_kib(), current_kib=current_rss_kib())

    def wait_for(self, command: str) -> None:
        """Block until the parent sends ``command`` (other commands are dropped)."""
        while self._commands.get() != command:
            pass

    def _read_stdin(self) -> None:
        for raw in sys.stdin:
            cmd = raw.strip()
            # ``rss`` is answered here, on the control thread, so that a
            # server never has to interleave it with its own event loop.
            if cmd == "rss":
                self.emit_rss()
            elif cmd:
                self._commands.put(cmd)
        # EOF: the parent closed our stdin or died.  Leave now, without
        # running cleanup that could hang on a half-dead connection.
        os._exit(0)


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------

_LIVE: set[Child] = set()
_LIVE_LOCK = threading.Lock()


class Child:
    """One child process started with a JSON spec for ``bench.worker``."""

    def __init__(self, spec: dict[str, Any], label: str) -> None:
        self.label = label
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", json.dumps(spec)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        # Reader threads, so that waiting for an event can time out and a
        # chatty stderr can never fill its pipe and block the child.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                self._stderr_tail.append(f"(bad stdout line) {line.rstrip()}")
        self._events.put(None)  # EOF marker

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr_tail.append(line.rstrip())

    def send(self, command: str) -> None:
        """Send one command word to the child."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ChildError(f"{self.label}: cannot send {command!r}: {self._why()}") from exc

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the child's next event, which must be ``event``.

        A child that reports ``{"event": "error"}``, exits, or stays silent
        past ``timeout`` raises ChildError carrying its reason.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(
                    f"{self.label}: no {event!r} within {timeout:.0f}s{self._why(': ')}"
                )
            try:
                msg = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg is None:
                self._events.put(None)  # keep the EOF marker for later calls
                raise ChildError(f"{self.label}: exited before {event!r}: {self._why()}")
            if msg.get("event") == "error":
                raise ChildError(f"{self.label}: {msg.get('message', 'unknown error')}")
            if msg.get("event") == event:
                return msg
            raise ChildError(f"{self.label}: expected {event!r}, got {msg.get('event')!r}")

    def ask_rss(self, timeout: float = 10.0) -> dict[str, Any]:
        """The child's peak and current RSS (KiB), as it measures them itself."""
        self.send("rss")
        return self.expect("rss", timeout)

    def _why(self, prefix: str = "") -> str:
        code = self._proc.poll()
        tail = " | ".join(line for line in self._stderr_tail if line.strip())[-600:]
        parts = ([f"exit code {code}"] if code is not None else []) + ([tail] if tail else [])
        return prefix + "; ".join(parts) if parts else ""

    def close_stdin(self) -> None:
        """Tell the child to exit (its watchdog ends it at EOF)."""
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass

    def close(self, grace: float = 2.0) -> None:
        """Close the child's stdin (it then exits by itself), kill it if it lingers."""
        self.close_stdin()
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@final
class ChildSet:
    """Context manager owning the children of one measurement: all die on exit."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def start(self, spec: dict[str, Any], label: str) -> Child:
        child = Child(spec, label)
        self._children.append(child)
        return child

    def __enter__(self) -> ChildSet:
        return self

    def __exit__(self, *exc: object) -> None:
        # Close all stdins first so the children exit in parallel, then reap.
        for child in self._children:
            child.close_stdin()
        for child in self._children:
            child.close()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort (e.g. KeyboardInterrupt mid-run): kill whatever still runs."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for child in leftovers:
        child.kill()
