"""The monitoring files of docker/ (compose profile `monitoring`): the Grafana dashboard, its provisioning and the
Prometheus scrape config. Statically: the dashboard JSON, every panel's datasource, the compose services' pinned
images and read-only mounts of files that exist, `promtool check config`. Live: a real Prometheus (Debian's package,
`make prometheus`) scrapes a real `bentoml serve` of the tiny model with the shipped config (only the target and the
intervals rewritten), and every panel's PromQL is asked of it over its HTTP API: each parses, names only metrics the
Bento exposes, and the key panels (request rate, latency quantiles, batch size, model info) return numbers."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tasks.common.processes import start_process, stop_process_tree

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MONITORING = DOCKER / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
GRAFANA = MONITORING / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "provider.yaml"
DASHBOARD = GRAFANA / "dashboards" / "textclf-serving.json"
SCRAPE_JOB = "textclf-classifier"
INSTALL_HINT = (
    "Run `make prometheus` (it apt-installs Debian's `prometheus` package, which ships `prometheus` and "
    "`promtool`; `make test` does it), or `apt-get install prometheus`."
)
# Grafana's built-in interval variables, as Grafana would expand them for a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
# The panels that must show numbers once the Bento has served some requests (the others may be empty or 0, e.g. 503).
MUST_ANSWER = (
    "Requests/s by HTTP status",
    "Latency p50 / p95 / p99 (answered 2xx)",
    "Adaptive batch size (requests per forward pass)",
    "Model and runtime serving",
    "In-flight requests",
)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: the monitoring dashboard test needs a real Prometheus. {INSTALL_HINT}")
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too, rows themselves left out."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def expressions(board: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana's built-in variables expanded) of every target."""
    found = []
    for panel in panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], target["refId"], expr))
    return found


def compose_services() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]


def bind_mounts(service: dict) -> dict[str, tuple[Path, str]]:
    """Container path -> (host path, options) of the service's bind mounts (sources starting with ./ or ../)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        if source.startswith("."):
            mounts[target] = ((DOCKER / source).resolve(), ",".join(options))
    return mounts


# ------------------------------------------------------------------------------------------------ static


def test_every_panel_has_promql_targets_on_the_provisioned_datasource():
    board = dashboard()
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(datasource) == 1 and datasource[0]["type"] == "prometheus" and datasource[0]["isDefault"] is True
    uid = datasource[0]["uid"]
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    assert not board.get("templating", {}).get("list"), "dashboard variables: expand them in expressions() too"
    found = panels(board)
    assert len({p["id"] for p in found}) == len(found), "panel ids must be unique"
    for panel in found:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])
            assert "$" not in expressions({"panels": [{**panel, "targets": [target]}]})[0][2], (
                f"{panel['title']}: a variable Grafana does not define"
            )
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
    # What issue 12 asks the dashboard to show, each by the metric BentoML (or the service) really exposes.
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in found}
    assert set(MUST_ANSWER) <= set(by_title)
    assert "http_response_code" in by_title["Requests/s by HTTP status"]
    assert all(
        f"histogram_quantile({q}," in by_title["Latency p50 / p95 / p99 (answered 2xx)"]
        for q in ("0.5", "0.95", "0.99")
    )
    assert "bentoml_service_adaptive_batch_size" in by_title["Adaptive batch size (requests per forward pass)"]
    assert "bentoml_service_request_in_progress" in by_title["In-flight requests"]
    assert 'http_response_code="503"' in by_title["503 share (over capacity)"]
    assert (
        "runtime" in by_title["Model and runtime serving"]
        and "textclf_model_info" in by_title["Model and runtime serving"]
    )


def test_grafana_provisioning_matches_prometheus_and_the_mounted_dashboard_folder():
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # $__rate_interval is 4 x the datasource's scrape interval: it must be Prometheus's, or rates come out empty.
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    services = compose_services()
    host, _, port = datasource["url"].removeprefix("http://").partition(":")
    assert host == "prometheus" and f"{port}:{port}" in services["prometheus"]["ports"]
    providers = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    mounts = bind_mounts(services["grafana"])
    assert mounts[providers[0]["options"]["path"]][0] == DASHBOARD.parent.resolve()


def test_shipped_prometheus_config_passes_promtool_and_scrapes_the_classifier():
    done = subprocess.run(
        [binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    from flows.settings import Settings

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == SCRAPE_JOB and job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": [f"classifier:{Settings.model_fields['bento_port'].default}"]}]
    assert "classifier" in compose_services()
    # No credentials: /metrics stays open when TEXTCLF_API_TOKEN protects /classify (the live test's Bento has a token).
    assert not {"authorization", "basic_auth", "oauth2"} & set(job)


def test_compose_monitoring_profile_pins_images_and_mounts_the_files_read_only():
    services = compose_services()
    monitoring = {name for name, service in services.items() if "monitoring" in service.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    for name in monitoring:
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert re.fullmatch(r"(prom/prometheus|grafana/grafana):v?\d+\.\d+\.\d+", service["image"]), service["image"]
        mounts = bind_mounts(service)
        assert mounts, f"{name} mounts no file of docker/monitoring"
        for target, (source, options) in mounts.items():
            assert source.exists(), f"compose {name} mounts {source}, which does not exist"
            assert MONITORING.resolve() in (source, *source.parents), f"{name}: {source} is not under docker/monitoring"
            assert "ro" in options.split(","), f"compose {name} mounts {target} writable"
    prometheus, grafana = services["prometheus"], services["grafana"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert bind_mounts(prometheus)[config][0] == PROMETHEUS_CONFIG.resolve()
    provisioning = bind_mounts(grafana)["/etc/grafana/provisioning"][0]
    assert (provisioning / "datasources" / DATASOURCES.name).resolve() == DATASOURCES.resolve()
    assert (provisioning / "dashboards" / DASHBOARD_PROVIDER.name).resolve() == DASHBOARD_PROVIDER.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert bind_mounts(grafana)[str(Path(home).parent)][0] / Path(home).name == DASHBOARD.resolve()
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    # No two services publish the same host port (Grafana listens on 3000 in its container, like the classifier).
    published = [port.split(":")[0] for service in services.values() for port in service.get("ports", [])]
    assert len(published) == len(set(published)), published


# ------------------------------------------------------------------------------------------------ live


TOKEN = "monitoring-test-token"


@pytest.fixture(scope="module")
def bento(bento_env, tmp_path_factory):
    """The tiny model served with an API token, as compose may serve it: Prometheus scrapes it without one."""
    from tasks.promotion.bento import stop_bento_server
    from tests.fixtures import serve_from_repository

    binary("prometheus")  # fail before starting a Bento when there is no Prometheus
    process, url = serve_from_repository(
        {**bento_env, "TEXTCLF_API_TOKEN": TOKEN}, tmp_path_factory.mktemp("serve") / "serve.log"
    )
    yield url
    stop_bento_server(process.pid)


@pytest.fixture(scope="module")
def prometheus(bento, tmp_path_factory):
    """Debian's Prometheus on a free loopback port, with the shipped scrape config pointed at the test's Bento and a
    1 s scrape interval."""
    from tasks.common.ports import free_port

    executable = binary("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [bento.removeprefix("http://")]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = root / "prometheus.log"
    command = [
        executable,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    process = start_process(command, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"Prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"Prometheus not ready in 30 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        stop_process_tree(process.pid, timeout_seconds=15)


def query(prometheus_url: str, expr: str) -> dict:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    return answer


def wait_for(prometheus_url: str, expr: str, accept, seconds: float = 20) -> list:
    deadline = time.monotonic() + seconds
    while True:
        result = query(prometheus_url, expr)["data"]["result"]
        if accept(result):
            return result
        assert time.monotonic() < deadline, f"Prometheus never answered {expr!r} as expected; last: {result}"
        time.sleep(0.3)


@pytest.mark.integration
def test_every_panel_query_runs_on_a_real_prometheus_scraping_a_real_bento(bento, prometheus):
    texts = ["match goal team", "software chip cloud", "recipe oven pasta", "the striker scored twice"]

    auth = {"Authorization": f"Bearer {TOKEN}"}

    def classify(i: int) -> int:
        return httpx.post(
            f"{bento}/classify", json={"texts": texts[: 1 + i % len(texts)]}, headers=auth, timeout=60
        ).status_code

    def bad_request() -> int:
        return httpx.post(f"{bento}/classify", json={"texts": [" "]}, headers=auth, timeout=60).status_code

    assert httpx.post(f"{bento}/classify", json={"texts": texts}, timeout=60).status_code == 401  # the token holds

    # One 200 and one 400 first, scraped before the traffic: a series' first sample is no increase for rate().
    assert (classify(0), bad_request()) == (200, 400)
    served = 'sum(bentoml_service_request_total{endpoint="/classify"})'
    wait_for(prometheus, served, lambda r: r and float(r[0]["value"][1]) >= 2)
    with ThreadPoolExecutor(8) as pool:  # concurrent, so adaptive batching merges some requests
        codes = list(pool.map(classify, range(48)))
    assert codes == [200] * 48
    assert [bad_request() for _ in range(2)] == [400, 400]
    # Wait until Prometheus has scraped every one of those requests, and each /classify series at least twice.
    wait_for(prometheus, served, lambda r: r and float(r[0]["value"][1]) >= 52)
    samples = 'min(count_over_time(bentoml_service_request_duration_seconds_count{endpoint="/classify"}[1m]))'
    wait_for(prometheus, samples, lambda r: r and float(r[0]["value"][1]) >= 2)

    names = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"])
    assert "textclf_model_info" in names, (
        "the service exposes no textclf_model_info{registered_model, model_version, runtime} gauge on /metrics"
    )
    results = {}
    for title, ref, expr in expressions(dashboard()):
        answer = query(prometheus, expr)
        assert answer["status"] == "success", f"{title} ({ref}): {expr}\n{answer}"
        for metric in set(re.findall(r"\b(?:bentoml|textclf)_[a-z_]+", expr)):
            assert metric in names, f"{title} ({ref}) reads {metric}, which the Bento does not expose"
        results.setdefault(title, []).append((expr, answer["data"]["result"]))

    for title in MUST_ANSWER:
        for expr, result in results[title]:
            assert result, f"{title}: {expr} returned nothing"
            values = [float(series["value"][1]) for series in result]
            assert all(math.isfinite(v) and v >= 0 for v in values), (title, expr, result)
    by_status = {
        s["metric"]["http_response_code"]: float(s["value"][1]) for s in results["Requests/s by HTTP status"][0][1]
    }
    assert by_status["200"] > 0 and by_status["400"] > 0, by_status
    latencies = [float(result[0]["value"][1]) for _, result in results["Latency p50 / p95 / p99 (answered 2xx)"]]
    assert 0 < latencies[0] <= latencies[1] <= latencies[2] < 60, latencies
    [share] = results["503 share (over capacity)"][0][1]
    assert float(share["value"][1]) == 0.0  # nothing was over capacity
    [model] = results["Model and runtime serving"][0][1]
    assert model["metric"]["registered_model"] == "topics" and model["metric"]["model_version"] == "7"
    assert model["metric"]["runtime"], model
