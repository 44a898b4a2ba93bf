"""Whether a process still runs, by pid: for files named after the process that writes them (a request-log journal,
a partial batch-scoring output), so a later process knows which ones were left by a process that is gone. Standard
library only (it ships in the Bento, bentofile.yaml `include`)."""

from __future__ import annotations

import os
from pathlib import Path


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
