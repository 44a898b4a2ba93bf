"""The embedded stack and the `textclf` command: servers are reused, ports taken by something else give a clear
error, environment overrides are honoured, and `textclf train` prints where to look."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.local_stack import LocalServerError, ensure_mlflow_server, ensure_prefect_server
from flows.settings import Settings
from tasks.common.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_running_servers_are_reused_not_restarted(servers):
    port = int(servers["mlflow"].rsplit(":", 1)[1])
    again = ensure_mlflow_server(servers["root"], port=port)
    assert not again.started and again.url == servers["mlflow"]
    prefect_port = int(servers["prefect"].removesuffix("/api").rsplit(":", 1)[1])
    assert not ensure_prefect_server(servers["root"], port=prefect_port).started


def test_a_port_taken_by_something_else_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(LocalServerError, match=rf"Port 127.0.0.1:{port} is taken.*TEXTCLF_MLFLOW_PORT"):
            ensure_mlflow_server(tmp_path, port=port)
    assert not (tmp_path / "logs" / "mlflow.pid").exists()


def test_settings_honour_existing_servers(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    settings = Settings()
    assert not settings.uses_embedded_prefect and not settings.uses_embedded_mlflow
    assert settings.resolved_prefect_api_url == "http://prefect.internal:4200/api"
    assert settings.resolved_mlflow_tracking_uri == "http://mlflow.internal:5000"


def test_settings_default_to_the_embedded_stack(monkeypatch, tmp_path):
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEXTCLF_HOME", str(tmp_path))
    monkeypatch.setenv("TEXTCLF_MLFLOW_PORT", "5123")
    settings = Settings()
    assert settings.resolved_mlflow_tracking_uri == "http://127.0.0.1:5123"
    assert settings.snapshot_dir == tmp_path.resolve() / "snapshots"


def _textclf(*args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.e2e
def test_textclf_train_starts_the_embedded_stack_and_prints_where_to_look(fixture_csv, tiny_model_dir, tmp_path):
    """The newcomer's path: no servers given, so `textclf train` starts its own (on SQLite under TEXTCLF_HOME)."""
    home = tmp_path / "home"
    mlflow_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(TEXTCLF_HOME=str(home), TEXTCLF_MLFLOW_PORT=str(mlflow_port), TEXTCLF_PREFECT_PORT=str(prefect_port))
    mlflow_url, prefect_ui = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
    try:
        done = _textclf(
            "train",
            "--source",
            str(fixture_csv),
            "--base-model",
            str(tiny_model_dir),
            "--max-length",
            "32",
            "--epochs",
            "2",
            "--learning-rate",
            "2e-3",
            "--registered-model-name",
            "cli-model",
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"Prefect server  started: {prefect_ui}" in done.stdout
        assert f"MLflow server   started: {mlflow_url}" in done.stdout
        assert "Registered model: cli-model version 1, alias @candidate" in done.stdout
        assert "Test macro-F1:" in done.stdout and "baseline" in done.stdout
        assert f"MLflow UI:        {mlflow_url}/#/models/cli-model" in done.stdout
        # The flow run is on the embedded Prefect server (not on an ephemeral one), completed.
        assert "Starting temporary server" not in done.stdout + done.stderr
        flow_run_id = done.stdout.split(f"{prefect_ui}/runs/flow-run/")[1].split()[0]
        flow_run = httpx.get(f"{prefect_ui}/api/flow_runs/{flow_run_id}").raise_for_status().json()
        assert flow_run["state"]["type"] == "COMPLETED"
        assert (home / "prefect" / "prefect.db").exists() and (home / "mlflow" / "mlflow.db").exists()

        # A second command reuses the running servers.
        status = _textclf("stack", "up", env=env, timeout=120)
        assert "Prefect server  running" in status.stdout and "MLflow server   running" in status.stdout

        # The rest of `make run`: promote the candidate (the first champion), then serve it and print a curl
        # example that works as printed.
        promoted = _textclf("promote", "--registered-model-name", "cli-model", "--first-champion-floor", "0", env=env)
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        assert "cli-model version 1: PROMOTED" in promoted.stdout and "No Docker engine" in promoted.stdout
        bento_port = free_port()
        served = _textclf(
            "serve", "--registered-model-name", "cli-model", env={**env, "TEXTCLF_BENTO_PORT": str(bento_port)}
        )
        assert served.returncode == 0, served.stderr[-3000:]
        assert "Serving cli-model version 1" in served.stdout and f"http://127.0.0.1:{bento_port}/" in served.stdout
        lines = served.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
        curl = subprocess.run(
            ["bash", "-c", "\n".join(lines[start : start + 2])], capture_output=True, text=True, timeout=60
        )
        answer = json.loads(curl.stdout)
        assert answer[0]["model_version"].split("+")[0] == "cli-model/1" and "probabilities" in answer[0]
    finally:
        _textclf("stack", "down", env=env, timeout=120)
    assert not (home / "logs" / "bento.pid").exists()  # `stack down` stopped the Bento server too


@pytest.mark.integration
def test_textclf_serve_without_a_champion_says_what_to_run(servers, tmp_path):
    env = {
        **os.environ,
        "PREFECT_API_URL": servers["prefect"],
        "MLFLOW_TRACKING_URI": servers["mlflow"],
        "TEXTCLF_HOME": str(tmp_path / "home"),
    }
    done = _textclf("serve", "--registered-model-name", "nothing-promoted", env=env, timeout=120)
    assert done.returncode == 1
    assert "has no @champion yet: run `.venv/bin/textclf promote`" in done.stderr


@pytest.mark.integration
def test_textclf_train_on_bad_data_exits_nonzero_with_the_reason(servers, tmp_path, tiny_model_dir):
    bad = tmp_path / "one-class.csv"
    bad.write_text("text,label\n" + "".join(f"text number {i},only\n" for i in range(10)))
    env = {
        **os.environ,
        "PREFECT_API_URL": servers["prefect"],
        "MLFLOW_TRACKING_URI": servers["mlflow"],
        "TEXTCLF_HOME": str(tmp_path / "home"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--source", str(bad), "--base-model", str(tiny_model_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert "Only one class ('only')" in done.stderr
    assert not (tmp_path / "home" / "snapshots").exists() or not any((tmp_path / "home" / "snapshots").iterdir())


def test_server_logs_rotate_by_size_and_keep_every_line(tmp_path):
    """A server's output through the log writer: files of at most max_bytes, `backups` old ones kept, the newest
    lines in the current file, nothing garbled; the writer ends with the server."""
    import subprocess
    import sys

    from flows.log_rotation import start_with_rotating_log

    log = tmp_path / "logs" / "server.log"
    script = "import sys\nfor i in range(20000): print(f'line {i:05d} ' + 'x' * 40)\nprint('done', file=sys.stderr)"
    process = start_with_rotating_log(
        [sys.executable, "-c", script], dict(os.environ), log, max_bytes=100_000, backups=3
    )
    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while "done" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    files = sorted(log.parent.iterdir())
    assert [f.name for f in files] == ["server.log", "server.log.1", "server.log.2", "server.log.3"]
    assert all(f.stat().st_size <= 100_000 for f in files)
    current = log.read_text().splitlines()
    assert current[-1] == "done" and current[-2].startswith("line 19999 ")  # stderr too, in order
    kept = [line for f in reversed(files) for line in f.read_text().splitlines()]
    numbers = [int(line.split()[1]) for line in kept if line.startswith("line ")]
    assert numbers == list(range(numbers[0], 20000))  # the newest lines, contiguous: none lost or garbled
    assert subprocess.run(["pgrep", "-f", f"flows.log_rotation {log}"], capture_output=True).returncode == 1
