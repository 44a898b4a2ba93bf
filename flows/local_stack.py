"""The embedded default stack: a Prefect server and an MLflow tracking server on loopback,
both on SQLite files under the project data folder. Started when not running, reused when they are."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flows.log_rotation import start_with_rotating_log
from tasks.common.ports import port_in_use
from tasks.common.processes import process_alive, stop_process_tree
from tasks.promotion.bento import with_own_metrics_folder

STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LocalServer:
    name: str
    url: str  # what clients use (Prefect API URL / MLflow tracking URI)
    ui_url: str
    log_path: Path
    pid: int | None  # None when an already-running server was reused
    started: bool


class LocalServerError(RuntimeError):
    pass


def _bin(name: str) -> str:
    """The console script installed next to this interpreter (the project's virtual environment)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def is_healthy(health_url: str, expected: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=2) as response:
            body = response.read().decode("utf-8", "replace")
            return response.status == 200 and (expected is None or expected in body)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _start(
    name: str,
    command: list[str],
    env: dict[str, str],
    health_url: str,
    expected: str | None,
    log_path: Path,
    host: str,
    port: int,
) -> int:
    if port_in_use(host, port):
        raise LocalServerError(
            f"Port {host}:{port} is taken by something that is not a healthy {name} server "
            f"(no answer at {health_url}). Stop it, or pick another port with "
            f"TEXTCLF_{name.upper()}_PORT."
        )
    # A new session: the server outlives the command that started it, and Ctrl-C there does not kill it. Its log is
    # size-bounded: rotated at 10 MB, 5 old files kept (flows/log_rotation.py).
    process = start_with_rotating_log(command, env, log_path)
    (log_path.parent / f"{name}.pid").write_text(str(process.pid))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if is_healthy(health_url, expected):
            return process.pid
        if process.poll() is not None:
            time.sleep(0.5)  # the log writer copies the server's last lines
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise LocalServerError(f"The {name} server exited with code {process.returncode}. Log {log_path}:\n{tail}")
        time.sleep(0.5)
    process.terminate()
    raise LocalServerError(
        f"The {name} server did not answer at {health_url} within {STARTUP_TIMEOUT_S:.0f} s; see {log_path}."
    )


def ensure_prefect_server(
    root: Path, host: str = "127.0.0.1", port: int = 4200, database_url: str | None = None
) -> LocalServer:
    """`database_url` (e.g. postgresql+asyncpg://user@host:5432/db) instead of the SQLite file under `root`."""
    api_url = f"http://{host}:{port}/api"
    health_url = f"{api_url}/health"
    log_path = root / "logs" / "prefect.log"
    if is_healthy(health_url):
        return LocalServer("prefect", api_url, f"http://{host}:{port}", log_path, None, started=False)
    prefect_home = root / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url,
    }
    env.pop("PREFECT_API_URL", None)
    command = [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]
    pid = _start("prefect", command, env, health_url, None, log_path, host, port)
    return LocalServer("prefect", api_url, f"http://{host}:{port}", log_path, pid, started=True)


def ensure_mlflow_server(
    root: Path, host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None
) -> LocalServer:
    """`backend_store_uri` (e.g. postgresql://user@host:5432/db) instead of the SQLite file under `root`; the
    artifacts stay under `root` (served by the tracking server)."""
    url = f"http://{host}:{port}"
    health_url = f"{url}/health"
    log_path = root / "logs" / "mlflow.log"
    if is_healthy(health_url, "OK"):
        return LocalServer("mlflow", url, url, log_path, None, started=False)
    mlflow_home = root / "mlflow"
    (mlflow_home / "artifacts").mkdir(parents=True, exist_ok=True)
    command = [
        _bin("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri or f"sqlite:///{mlflow_home / 'mlflow.db'}",
        "--artifacts-destination",
        str(mlflow_home / "artifacts"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    pid = _start("mlflow", command, env, health_url, "OK", log_path, host, port)
    return LocalServer("mlflow", url, url, log_path, pid, started=True)


def serve_bento(root: Path, bento_tag: str, host: str = "127.0.0.1", port: int = 3000) -> LocalServer:
    """Serve `bento_tag` with `bentoml serve` on loopback, replacing the Bento server this stack started before
    (a new champion replaces the old one on the same port)."""
    pid_file = root / "logs" / "bento.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError):
            stop_process_tree(int(pid_file.read_text()))  # its workers too: they sit in process groups of their own
        pid_file.unlink(missing_ok=True)
        deadline = time.monotonic() + 30
        while port_in_use(host, port) and time.monotonic() < deadline:
            time.sleep(0.2)
    url = f"http://{host}:{port}"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("TEXTCLF_BENTO_MODEL", None)  # a built Bento serves the one model packed into it
    # The request log goes to <TEXTCLF_HOME>/request-log unless set, as an absolute path: a built Bento's server
    # runs inside the Bento's folder, where a relative path would land.
    log_dir = env.get("TEXTCLF_REQUEST_LOG_DIR", "").strip()
    env["TEXTCLF_REQUEST_LOG_DIR"] = str(Path(log_dir).expanduser().resolve() if log_dir else root / "request-log")
    env = with_own_metrics_folder(env, root / "logs" / "bento.bentoml-home")  # a smoke test cannot blank its metrics
    command = [_bin("bentoml"), "serve", bento_tag, "--host", host, "--port", str(port)]
    pid = _start("bento", command, env, f"{url}/readyz", None, root / "logs" / "bento.log", host, port)
    return LocalServer("bento", url, url, root / "logs" / "bento.log", pid, started=True)


def stop_local_servers(root: Path) -> list[str]:
    """Stop the servers this folder's stack started (by their pid files)."""
    stopped = []
    for pid_file in sorted((root / "logs").glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            pid_file.unlink(missing_ok=True)
            continue
        if process_alive(pid):
            stop_process_tree(pid)  # the server and everything below it (a Bento's workers, the log writers)
            stopped.append(pid_file.stem)
        pid_file.unlink(missing_ok=True)
    return stopped
