#!/usr/bin/env python
"""What hostile input costs the served Bento, measured from outside on a real `bentoml serve` (the packaged MiniLM
with an untrained head, the service's defaults):

- 5,000 requests to distinct unknown paths: the size of /metrics, the time to scrape it and the worker's resident
  memory before and after (before this service labelled unknown paths as one, the same 5,000 grew /metrics from
  127 KB to 21 MB, a scrape to 7.9 s and the worker by 290 MB);
- a 50 MB body (answered 413 from its Content-Length) and the same streamed without one;
- one request of 64 texts of 20,000 characters (over the request budget: 400) and, while it is sent again and again,
  the latency of single small requests from another client (it used to tie the server up for 3-6 s);
- multipart without boundary (was a 500), NUL-only and zero-width texts (were classified).

Run from the repository root:  .venv/bin/python bench/hostile_input.py   Writes bench/results/hostile_input.json."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically
from serving_load import BIN, REPO, Server, bento_env, build_default_model, import_model

DEFAULT_OUTPUT = REPO / "bench" / "results" / "hostile_input.json"


def worker_rss_mb(server_pid: int) -> float:
    from tasks.promotion.bento import bento_worker_pids

    total = 0.0
    for pid in bento_worker_pids(server_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return round(total, 1)


def scrape(client) -> tuple[int, float]:
    began = time.perf_counter()
    size = len(client.get("/metrics").content)
    return size, round((time.perf_counter() - began) * 1000, 1)


def main(argv: list[str] | None = None) -> dict:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=5000)
    parser.add_argument("--model-dir", type=Path, default=None, help="A TextClassifier folder (default: MiniLM).")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="textclf-hostile-"))
    try:
        model = args.model_dir or build_default_model("all-MiniLM-L6-v2", 128, work / "model")
        home = work / "bentoml"
        env = bento_env(home, import_model(model, home), None)
        env.pop("TEXTCLF_ADAPTIVE_BATCHING", None)
        server = Server(
            "guarded",
            [str(BIN / "bentoml"), "serve", "service:TextClassifierService", "--host", "127.0.0.1", "--port", "{port}"],
            env,
            work / "serve.log",
            "/readyz",
        )
        result: dict = {"benchmark": "hostile_input"}
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=120) as client:
                client.post("/classify", json={"texts": ["warm up"]})
                size, took = scrape(client)
                before = {"metrics_bytes": size, "scrape_ms": took, "worker_rss_mb": worker_rss_mb(server.process.pid)}
                began = time.perf_counter()
                statuses = {client.get(f"/scan/{i}/wp-admin.php").status_code for i in range(args.paths)}
                spent = time.perf_counter() - began
                size, took = scrape(client)
                after = {"metrics_bytes": size, "scrape_ms": took, "worker_rss_mb": worker_rss_mb(server.process.pid)}
                result["unknown_paths"] = {
                    "requests": args.paths,
                    "statuses": sorted(statuses),
                    "requests_per_s": round(args.paths / spent, 1),
                    "before": before,
                    "after": after,
                }

                huge = b'{"texts": ["' + b"x" * (50 * 1024 * 1024) + b'"]}'
                began = time.perf_counter()
                status = client.post("/classify", content=huge, headers={"content-type": "application/json"})
                result["body_50mb"] = {
                    "status": status.status_code,
                    "ms": round((time.perf_counter() - began) * 1000, 1),
                }

                big = {"texts": ["word " * 4000] * 64}
                stop, singles = threading.Event(), []

                def hammer():
                    with httpx.Client(base_url=server.url, timeout=120) as other:
                        while not stop.is_set():
                            other.post("/classify", json=big)

                quiet = []
                for _ in range(10):
                    began = time.perf_counter()
                    client.post("/classify", json={"texts": ["a short text about the markets"]})
                    quiet.append((time.perf_counter() - began) * 1000)
                thread = threading.Thread(target=hammer)
                thread.start()
                time.sleep(0.5)
                for _ in range(20):
                    began = time.perf_counter()
                    client.post("/classify", json={"texts": ["a short text about the markets"]})
                    singles.append((time.perf_counter() - began) * 1000)
                stop.set()
                thread.join()
                oversized = client.post("/classify", json=big)
                result["request_64x20000_chars"] = {
                    "status": oversized.status_code,
                    "error": oversized.json().get("detail", [{}])[0].get("msg"),
                    "single_request_ms_quiet_median": round(statistics.median(quiet), 1),
                    "single_request_ms_while_hammered_median": round(statistics.median(singles), 1),
                    "single_request_ms_while_hammered_max": round(max(singles), 1),
                }
                result["multipart_without_boundary"] = client.post(
                    "/classify", content=b"x", headers={"content-type": "multipart/form-data"}
                ).status_code
                result["invisible_texts"] = client.post(
                    "/classify", json={"texts": ["\u0000\u0000", "\u200b\u200d"]}
                ).status_code
            log = server.log_tail(10_000_000)
            result["log"] = {"lines": len(log.splitlines()), "tracebacks": log.count("Traceback")}
        finally:
            server.stop()
        write_json_atomically(args.output, result)
        import json

        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
