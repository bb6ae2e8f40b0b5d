"""A multi-process run's process under a watcher, so that every failure ends in one line.

JAX's distributed runtime ends a process with SIGABRT and a C++ stack when the peers do not
all join in time, or when a peer stops mid-run (a process left waiting at a collective or
at the shutdown barrier). Python cannot catch that, so `python -m train.main` with
JAX_COORDINATOR_ADDRESS set runs the training as a child process and watches it: the child's
output passes through, the runtime's own C++ log lines go to a file in the workdir, and an
end by a signal becomes one line naming what happened and what was saved, with exit status 1.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

CHILD_VAR = "DENSENET_JAX_SUPERVISED"  # set in the child: it trains instead of watching

# absl/glog lines from C++ sources, e.g.
# "E1130 20:09:05.774150   23732 coordination_service.cc:1520] ..."
RUNTIME_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w./-]+\.(cc|h|cpp):\d+\]")


def wanted(environ=os.environ) -> bool:
    """Whether this process should watch a child: a multi-process run, not yet watched."""
    return bool(environ.get("JAX_COORDINATOR_ADDRESS")) and not environ.get(CHILD_VAR)


def split_runtime_lines(lines: Iterable[bytes], write: Callable[[bytes], None]) -> list[bytes]:
    """Pass `lines` to `write`, except the C++ runtime's log: each runtime line, and after an
    error- or fatal-level one every line up to the next of ours (`error: `, `interrupted`,
    a Python traceback), since its messages and stack run over many lines. Returns what was
    kept back."""
    kept, inside = [], False
    for line in lines:
        match = RUNTIME_LINE.match(line)
        if match:
            inside = line[:1] in (b"E", b"F")
        elif inside and line.startswith((b"error: ", b"interrupted", b"Traceback")):
            inside = False
        if match or inside:
            kept.append(line)
        else:
            write(line)
    return kept


def ending(returncode: int, runtime: list[bytes], said_error: bool, environ=os.environ,
           saved: str | None = None) -> str | None:
    """The one line for a child that ended by a signal (None: it did not, or it had said
    why itself, with an error line or a traceback)."""
    if returncode >= 0 or said_error:
        return None
    text = b"".join(runtime).decode(errors="replace")
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    processes = environ.get("JAX_NUM_PROCESSES", "all")
    kept = f"; {saved}" if saved else ""
    if "RegisterTask" in text or "/Connect" in text:
        timeout = environ.get("DENSENET_JAX_JOIN_TIMEOUT", "300")
        ids = f" (JAX_PROCESS_ID 0 to {int(processes) - 1})" if processes.isdigit() else ""
        return (f"error: not all {processes} processes joined at {address} within {timeout} s; "
                f"start every one{ids} with the same JAX_COORDINATOR_ADDRESS, or let them "
                f"wait longer with $DENSENET_JAX_JOIN_TIMEOUT")
    if returncode == -signal.SIGABRT:
        return (f"error: this process lost contact with the others of the run at {address} (a "
                f"peer stopped, or the network failed){kept}; start every process again"
                f"{' with --resume' if saved else ''}")
    name = signal.Signals(-returncode).name
    return f"error: the training process was stopped by {name}{kept}"


def supervise(module: str, argv: list[str], workdir: Path, saved: Callable[[], str | None],
              environ=os.environ) -> int:
    """Run `python -m module argv` as a watched child; its exit status, or 1 with one line
    when it ended by a signal. SIGTERM is passed on; Ctrl-C reaches the child from the
    terminal (same process group), so this process only ignores it."""
    child = subprocess.Popen([sys.executable, "-m", module, *argv],
                             env={**environ, CHILD_VAR: "1"}, stderr=subprocess.PIPE)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM,
                                              lambda signum, _: child.send_signal(signum)),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
    said_error = False

    def write(line: bytes) -> None:
        nonlocal said_error
        said_error |= line.startswith((b"error: ", b"Traceback"))
        sys.stderr.buffer.write(line)
        sys.stderr.flush()

    try:
        runtime = split_runtime_lines(child.stderr, write)
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    message = ending(returncode, runtime, said_error, environ, saved() if returncode < 0 else None)
    if runtime and workdir.is_dir():
        log = workdir / f"runtime-process{environ.get('JAX_PROCESS_ID', '0')}.log"
        log.write_bytes(b"".join(runtime))
        message = message and f"{message} (the runtime's log: {log})"
    if message:
        print(message, file=sys.stderr)
        return 1
    return returncode if returncode >= 0 else 1
