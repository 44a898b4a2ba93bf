"""The Bento service through a real `bentoml serve` process and real HTTP: predictions, truncation, batching
consistency, every bad input answered with a 4xx that says what was wrong, docs/health/metrics, and auth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from flows.local_stack import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _serve(env: dict, log: Path):
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "service:TextClassifierService", "--host",
         "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"bentoml serve did not become ready: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def bento_env(tmp_path_factory, tuned_fixture):
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("TEXTCLF_API_TOKEN", None)
    script = ("import sys; from pathlib import Path; from tasks.bento import import_to_bento_store; "
              "print(import_to_bento_store(Path(sys.argv[1]), 'text-classifier', 'topics', 7))")
    done = subprocess.run([sys.executable, "-c", script, str(tuned_fixture.model_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    env["TEXTCLF_BENTO_MODEL"] = done.stdout.strip().splitlines()[-1]
    return env


@pytest.fixture(scope="module")
def server(bento_env, tmp_path_factory):
    process, url = _serve(bento_env, tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def classify(url, texts, **kwargs):
    return httpx.post(f"{url}/classify", json={"texts": texts}, timeout=60, **kwargs)


def test_classify_returns_label_probabilities_version_and_truncation(server, tuned_fixture, prepared_fixture):
    _, prepared = prepared_fixture
    long_text = " ".join(["the striker scored a goal"] * 40)  # far over the tiny model's 32 tokens
    response = classify(server, ["the striker scored a goal for the team", long_text])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    short, long = response.json()
    for prediction in (short, long):
        assert prediction["label"] in prepared.label_names
        assert set(prediction["probabilities"]) == set(prepared.label_names)
        assert prediction["probability"] == pytest.approx(max(prediction["probabilities"].values()))
        assert prediction["model_version"] == "topics/7"
    assert (short["truncated"], long["truncated"]) == (False, True)


def test_answers_match_the_model_in_process(server, tuned_fixture, prepared_fixture):
    from tasks.classifier import TextClassifier

    texts = prepared_fixture[1].split("test")["text"].tolist()
    expected = TextClassifier(tuned_fixture.model_dir).predict(texts)["label"].tolist()
    assert [p["label"] for p in classify(server, texts).json()] == expected


def test_concurrent_single_text_requests_equal_one_batched_call_in_order(server, prepared_fixture):
    texts = prepared_fixture[1].split("test")["text"].tolist() * 2
    batched = classify(server, texts).json()
    with ThreadPoolExecutor(max_workers=16) as pool:
        singles = list(pool.map(lambda text: classify(server, [text]), texts))
    assert all(r.status_code == 200 for r in singles)
    assert [r.json()[0]["label"] for r in singles] == [p["label"] for p in batched]
    for single, together in zip(singles, batched):
        assert single.json()[0]["probability"] == pytest.approx(together["probability"], abs=1e-4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"texts": ', "Invalid JSON"),
        (b'{"texts": "just one string"}', "valid array"),
        (b'{"texts": [1, 2]}', "valid string"),
        (b'{"text": ["wrong field"]}', "texts"),
        (b'{"texts": []}', "at least 1 item"),
        (b'{"texts": [""]}', "empty or whitespace-only"),
        (b'{"texts": ["   \\n\\t "]}', "empty or whitespace-only"),
        (b'{"texts": ["ok", "' + b"x" * 20_001 + b'"]}', "at most 20000 characters"),
        (b'{"texts": [' + b",".join([b'"text"'] * 65) + b"]}", "at most 64 items"),
        (b'{"texts": ["\xff\xfe invalid utf-8"]}', "Invalid JSON"),
    ],
    ids=["broken-json", "string-not-list", "numbers", "wrong-field", "empty-list", "empty-text", "blank-text",
         "text-too-long", "too-many-texts", "invalid-utf8"],
)
def test_bad_input_gets_400_with_the_reason_and_the_server_stays_up(server, body, message):
    response = httpx.post(f"{server}/classify", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.text
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_docs_health_and_prometheus_metrics(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    docs = httpx.get(f"{server}/docs.json").json()
    assert "/classify" in docs["paths"]
    # The answer is documented as JSON: an array of predictions, each with its label and probabilities.
    answer = docs["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array"
    prediction = docs["components"]["schemas"][answer["items"]["$ref"].rsplit("/", 1)[-1]]
    assert {"label", "probability", "probabilities", "truncated", "model_version"} <= set(prediction["properties"])
    ui = httpx.get(f"{server}/")  # BentoML serves the Swagger UI at the root
    assert ui.status_code == 200 and "swagger" in ui.text.lower()
    classify(server, ["warm the metrics"])
    metrics = httpx.get(f"{server}/metrics").text
    assert "bentoml_service_adaptive_batch_size_bucket" in metrics
    assert 'method_name="classify"' in metrics


def test_bearer_token_auth_when_switched_on(bento_env, tmp_path):
    process, url = _serve({**bento_env, "TEXTCLF_API_TOKEN": "s3cret"}, tmp_path / "serve.log")
    try:
        assert classify(url, ["no token"]).status_code == 401
        wrong = classify(url, ["wrong token"], headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.text
        assert classify(url, ["right token"], headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200  # probes need no token
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/docs.json").status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_bentofile_builds_a_bento_with_its_dockerfile_and_the_built_bento_serves(bento_env, tmp_path):
    """`bentoml build` from bentofile.yaml (the only build configuration), then `bentoml serve <bento tag>`.
    Containerizing needs a Docker engine, which is not available here: the generated Dockerfile is checked."""
    import yaml

    built = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag"],
                           cwd=ROOT, env=bento_env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_dir = Path(bento_env["BENTOML_HOME"]) / "bentos" / name / version
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM" in dockerfile and "bentoml" in dockerfile.lower()
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in manifest["services"][0]["models"]] == [bento_env["TEXTCLF_BENTO_MODEL"]]
    assert (bento_dir / "src" / "tasks" / "classifier.py").exists()

    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={k: v for k, v in bento_env.items() if k != "TEXTCLF_BENTO_MODEL"},
        stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the built Bento did not become ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        answer = classify(url, ["the striker scored a goal"])
        assert answer.status_code == 200 and answer.json()[0]["model_version"] == "topics/7"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
