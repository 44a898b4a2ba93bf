"""Child processes: starting a server in a session of its own, whether one still runs (for files named after the
process that writes them: a request-log journal, a partial batch-scoring output), the processes below one, and
stopping a server with everything below it. Every server the product or its tests start goes through
`start_process` and `stop_process_tree`. Standard library only (it ships in the Bento, bentofile.yaml `include`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def start_process(
    command: Sequence[str],
    output: Path | IO[Any] | int,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own: it outlives the caller, a Ctrl-C in the caller's terminal does not
    reach it, and `stop_process_tree` stops it with everything it starts. Its stdout and stderr go to `output`: a log
    file (appended to; its folder made), an open file or pipe; stdin is /dev/null. `env` is the whole environment
    (None: the caller's)."""
    if isinstance(output, Path):
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("ab") as log:
            return start_process(command, log, env, cwd)
    return subprocess.Popen(
        list(command),
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )


def process_alive(pid: int | str) -> bool:
    """True while `pid` runs (someone else's process included); False for no such process, a zombie (killed, not
    yet reaped by its parent) or a pid that is not a number."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): alive, as kill() said
        return True


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (children, their children, ...), from Linux's /proc; [] elsewhere. A
    server's workers may sit in process groups of their own (BentoML's do), out of reach of a signal to its group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack += children.get(child, [])
    return found


def stop_process_tree(process_id: int, timeout_seconds: float = 30) -> None:
    """SIGTERM the process group of `process_id` (a server started in a session of its own), SIGKILL what is left
    after `timeout_seconds`: the group and every process below it (BentoML's workers run in process groups of their
    own, out of reach of a signal to the server's group). Returns once all of them are gone."""
    tree = [process_id, *descendants(process_id)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process_id, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        # A worker the server starts while it shuts down (a supervisor restarting one) is in the tree too.
        tree += [pid for pid in descendants(process_id) if pid not in tree]
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(process_id, os.WNOHANG)  # reap it when it is our child, or it stays a zombie
        if not any(process_alive(pid) for pid in tree):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process_id, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(process_id, 0)
