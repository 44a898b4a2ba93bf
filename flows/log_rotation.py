"""Size-bounded logs for the servers the embedded stack starts (Prefect, MLflow, `textclf serve`'s Bento): a small
process reads a server's output from a pipe and writes it to `<log>`, which it rotates to `<log>.1` ... `<log>.N`
(the standard library's RotatingFileHandler) when it outgrows `max_bytes`. It ends when the server and every
process it started have closed the pipe. Containers log to stdout instead, which Docker and Kubernetes rotate.

    python -m flows.log_rotation <log> [--max-bytes N] [--backups N]   (reads standard input)"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from tasks.common.processes import start_process

LOG_MAX_BYTES = 10 * 1024 * 1024  # per file; with LOG_BACKUPS, at most 60 MB a server
LOG_BACKUPS = 5


def start_with_rotating_log(
    command: list[str], env: dict[str, str], log_path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS
) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own (it outlives the caller), its stdout and stderr going to a rotating
    `log_path`. Returns the server's process (its pid is the server's, not the log writer's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.log_rotation",
            str(log_path),
            "--max-bytes",
            str(max_bytes),
            "--backups",
            str(backups),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert writer.stdin is not None  # stdin=PIPE
    try:
        return start_process(command, writer.stdin, env)
    except BaseException:
        writer.kill()
        raise
    finally:
        writer.stdin.close()  # the server holds the pipe now; the writer ends when it (and its children) close it


def copy_with_rotation(source: BinaryIO, log_path: Path, max_bytes: int, backups: int) -> None:
    """Every line of the binary stream `source` into `log_path`, rotated by size, each line flushed at once."""
    handler = logging.handlers.RotatingFileHandler(
        log_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="replace"
    )
    handler.terminator = ""
    handler.setFormatter(logging.Formatter("%(message)s"))
    for line in iter(source.readline, b""):
        handler.emit(logging.makeLogRecord({"msg": line.decode("utf-8", "replace"), "levelno": logging.INFO}))
    handler.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Copy standard input to a size-rotated log file.")
    parser.add_argument("log", type=Path)
    parser.add_argument("--max-bytes", type=int, default=LOG_MAX_BYTES)
    parser.add_argument("--backups", type=int, default=LOG_BACKUPS)
    args = parser.parse_args(argv)
    copy_with_rotation(sys.stdin.buffer, args.log, args.max_bytes, args.backups)


if __name__ == "__main__":
    main()
