"""Stage 7, package: turn a registered model version into a served Bento.

1. `download_model_version`: fetch the version's pyfunc model from MLflow (the fine-tuned folder is inside it), and
   the optimized runtime its tags name (tasks/promotion/optimize_runtime.py `fetch_runtime`: runtime.json and the ONNX file),
   so the Bento, batch scoring and drift monitoring all answer with the same runtime.
2. `import_to_bento_store`: copy the fine-tuned folder (runtime files included) into the BentoML model store,
   labelled with the registered model, version and runtime (reused when that version and runtime are there).
3. `build_bento`: `bentoml build` from `bentofile.yaml`, the one build configuration, with labels naming the
   registered model and version.
4. `smoke_test_bento`: serve the built Bento on a free loopback port and check its answers against the
   registered model's own predictions. Only after this passes may `@champion` move.
5. `containerize_bento`: `bentoml containerize` where a Docker engine answers; otherwise say so and point at the
   Bento's generated Dockerfile.

BentoML keeps its stores under `BENTOML_HOME` (default `~/bentoml`); every step uses the same one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.common.ports import free_port
from tasks.common.processes import start_process, stop_process_tree
from tasks.registry import DownloadedModel
from tasks.serving.classifier import save_merged

BENTO_MODEL_NAME = "text-classifier"
PROJECT_DIR = Path(__file__).resolve().parents[2]  # where bentofile.yaml and service.py live


class BentoError(RuntimeError):
    """Building, serving or checking a Bento failed; the message says which step and shows its log."""


class BentoBuild(BaseModel):
    model_config = ConfigDict(frozen=True)

    bento_tag: str
    model_tag: str
    registered_model: str
    model_version: int
    bento_dir: Path
    dockerfile: Path
    runtime: str = (
        "pytorch"  # the inference runtime the packed model folder answers with (tasks/serving/onnx_runtime.py)
    )

    @property
    def served_version(self) -> str:
        """What the service puts in each answer's `model_version`: `<registered model>/<version>+<runtime>`."""
        return f"{self.registered_model}/{self.model_version}+{self.runtime}"


class SmokeTest(BaseModel):
    model_config = ConfigDict(frozen=True)

    bento_tag: str
    texts: int
    labels: list[str]
    seconds_to_ready: float


class ContainerImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    built: bool
    image: str | None
    dockerfile: Path
    message: str


def bentoml_executable() -> str:
    """The `bentoml` next to this interpreter (the project's virtual environment), else the one on PATH."""
    candidate = Path(sys.executable).parent / "bentoml"
    return str(candidate) if candidate.exists() else "bentoml"


def _tail(text: str, limit: int = 3000) -> str:
    return text[-limit:].strip()


def pick_smoke_texts(test_split: Path, count: int) -> list[str]:
    """Up to `count` distinct texts of the test split, the longest one among them, so truncation is exercised."""
    import pandas as pd

    texts = list(dict.fromkeys(pd.read_parquet(test_split, columns=["text"])["text"].astype(str)))
    if not texts:
        raise ValueError(f"{test_split} holds no texts to smoke-test the Bento with.")
    chosen = texts[: max(1, count - 1)]
    longest = max(texts, key=len)
    return chosen if longest in chosen or len(chosen) >= count else [*chosen, longest]


def predict_labels(downloaded: DownloadedModel, texts: list[str]) -> list[str]:
    """The registered pyfunc model's labels for `texts`: what the served Bento must answer."""
    import mlflow.pyfunc

    labels: list[str] = (
        mlflow.pyfunc.load_model(str(downloaded.pyfunc_dir)).predict(list(texts))["label"].astype(str).tolist()
    )
    return labels


def import_to_bento_store(model_dir: Path, bento_model_name: str, registered_model: str, version: int) -> str:
    """Copy the model folder into the BentoML model store; return its tag (name:version). A model already
    imported for the same registered model, version and runtime (and the same runtime file) is reused, so a rebuild
    (rollback) adds nothing."""
    import bentoml
    from bentoml.exceptions import NotFound

    from tasks.serving.onnx_runtime import read_runtime_file

    spec = read_runtime_file(model_dir)
    labels = {"registered_model": registered_model, "model_version": str(version), "runtime": spec["runtime"]}
    if spec.get("sha256"):
        labels["runtime_sha256"] = spec["sha256"][:16]
    try:
        existing = bentoml.models.list(bento_model_name)
    except NotFound:  # no model of that name yet
        existing = []
    for model in existing:
        if model.info.labels == labels:
            return str(model.tag)
    with bentoml.models.create(bento_model_name, labels=labels) as model:
        save_merged(model_dir, Path(model.path))  # adapters only (lora_merge=false): the Bento gets merged weights
    return str(model.tag)


def build_bento(model_tag: str, registered_model: str, version: int, project_dir: Path = PROJECT_DIR) -> BentoBuild:
    """`bentoml build` from `project_dir/bentofile.yaml`, serving `model_tag`, labelled with the registered model
    and version."""
    import bentoml
    import yaml

    from tasks.serving.onnx_runtime import folder_runtime

    command = [
        bentoml_executable(),
        "build",
        str(project_dir),
        "--output",
        "tag",
        "--label",
        f"registered_model={registered_model}",
        "--label",
        f"model_version={version}",
        "--arg",
        f"model_tag={model_tag}",  # kept in the Bento: the service loads exactly this model
    ]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("TEXTCLF_BENTO_MODEL", None)
    done = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True, timeout=900)
    tags = [line.removeprefix("__tag__:") for line in done.stdout.splitlines() if line.startswith("__tag__:")]
    if done.returncode != 0 or not tags:
        raise BentoError(
            f"`bentoml build` failed for {registered_model} version {version} (exit {done.returncode}). "
            f"Check {project_dir / 'bentofile.yaml'} and service.py.\n{_tail(done.stdout + done.stderr)}"
        )
    bento = bentoml.bentos.get(tags[-1])
    bento_dir = Path(bento.path)
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    packed = [model["tag"] for service in manifest.get("services", []) for model in service.get("models", [])]
    if packed != [model_tag]:
        raise BentoError(f"Bento {tags[-1]} packs models {packed}, expected exactly [{model_tag}].")
    return BentoBuild(
        bento_tag=str(bento.tag),
        model_tag=model_tag,
        registered_model=registered_model,
        model_version=int(version),
        bento_dir=bento_dir,
        dockerfile=bento_dir / "env" / "docker" / "Dockerfile",
        runtime=folder_runtime(bentoml.models.get(model_tag).path),
    )


def with_own_metrics_folder(env: dict[str, str], server_home: Path) -> dict[str, str]:
    """`env` with BENTOML_HOME set to `server_home`: a BentoML home for one server, whose `bentos` and `models` are
    the store's own (symlinks) but whose Prometheus folder is its own. `bentoml serve` empties
    `<BENTOML_HOME>/prometheus_multiproc_dir` when it starts (BentoML 1.4, bentoml/serving.py), while a server already
    running from that home keeps writing to the files it deleted: its /metrics go blank until it restarts. So the
    promotion's smoke test would blank the metrics of the champion `textclf serve` serves next to it."""
    store = Path(env.get("BENTOML_HOME") or "~/bentoml").expanduser().resolve()
    server_home.mkdir(parents=True, exist_ok=True)
    for name in ("bentos", "models"):
        (store / name).mkdir(parents=True, exist_ok=True)
        link = server_home / name
        if link.is_symlink() and link.resolve() != store / name:
            link.unlink()  # a folder reused for another store
        if not link.is_symlink():
            link.symlink_to(store / name, target_is_directory=True)
    return {**env, "BENTOML_HOME": str(server_home)}


def start_bento_server(
    bento_tag: str, host: str, port: int, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`bentoml serve <bento tag>` in its own process group (stop it with `stop_bento_server`), with a Prometheus
    folder of its own (`with_own_metrics_folder`, next to its log)."""
    server_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    server_env.pop("TEXTCLF_BENTO_MODEL", None)  # a built Bento serves the one model packed into it
    server_env = with_own_metrics_folder(server_env, log_path.with_name(f"{log_path.stem}.bentoml-home"))
    command = [bentoml_executable(), "serve", bento_tag, "--host", host, "--port", str(port)]
    return start_process(command, log_path, server_env, cwd=log_path.parent)


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_seconds: float) -> float:
    """Seconds until `/readyz` answered 200; raises BentoError with the log when the server exits or is late."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_seconds:
        if process.poll() is not None:
            raise BentoError(
                f"The Bento server exited with code {process.returncode} before it was ready. Log {log_path}:\n"
                f"{_tail(log_path.read_text(errors='replace'))}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BentoError(
        f"The Bento server at {url} was not ready within {timeout_seconds:.0f} s. Log {log_path}:\n"
        f"{_tail(log_path.read_text(errors='replace'))}"
    )


def stop_bento_server(process_id: int, timeout_seconds: float = 30) -> None:
    """Stop a `bentoml serve` started by `start_bento_server`, its workers included (tasks/common/processes.py)."""
    stop_process_tree(process_id, timeout_seconds)


def bento_worker_pids(server_pid: int) -> list[int]:
    """The BentoML worker processes under a `bentoml serve` process (they load the model and serve the requests)."""
    from tasks.common.processes import descendants

    workers = []
    for pid in descendants(server_pid):
        try:
            if b"_bentoml_impl.worker.service" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:  # gone since it was listed
            continue
    return workers


def smoke_test_bento(
    build: BentoBuild, texts: list[str], expected_labels: list[str], log_dir: Path, timeout_seconds: float = 300
) -> SmokeTest:
    """Serve the built Bento on a free loopback port, classify `texts` in one request, and check that every answer
    is well formed, comes from the expected model version and has the expected label. Raises BentoError."""
    if not texts or len(texts) != len(expected_labels):
        raise ValueError("smoke_test_bento needs texts and one expected label per text.")
    host, port = "127.0.0.1", free_port()
    url = f"http://{host}:{port}"
    log_path = log_dir / f"smoke-{build.bento_tag.replace(':', '-')}.log"
    # The smoke test checks the model, not the deployment's auth: no bearer token on this private server, and its
    # requests are not production traffic: no request log.
    process = start_bento_server(
        build.bento_tag, host, port, log_path, env={"TEXTCLF_API_TOKEN": "", "TEXTCLF_REQUEST_LOG": "false"}
    )
    try:
        seconds = wait_until_ready(url, process, log_path, timeout_seconds)
        response = httpx.post(f"{url}/classify", json={"texts": list(texts)}, timeout=120)
        if response.status_code != 200:
            raise BentoError(
                f"Smoke request to {build.bento_tag} answered {response.status_code}: {response.text[:500]}"
            )
        answers = response.json()
    finally:
        stop_bento_server(process.pid)
    if len(answers) != len(texts):
        raise BentoError(f"Smoke request sent {len(texts)} texts to {build.bento_tag}, got {len(answers)} answers.")
    versions = {answer.get("model_version") for answer in answers}
    if versions != {build.served_version}:
        raise BentoError(
            f"Bento {build.bento_tag} answered as {sorted(map(str, versions))}, expected {build.served_version}."
        )
    labels = [answer["label"] for answer in answers]
    wrong = [(i, got, want) for i, (got, want) in enumerate(zip(labels, expected_labels)) if got != want]
    if wrong:
        shown = "; ".join(f"text {i}: served '{got}', registered model '{want}'" for i, got, want in wrong[:5])
        raise BentoError(
            f"Bento {build.bento_tag} disagrees with the registered model on {len(wrong)} of {len(texts)} texts: {shown}."
        )
    return SmokeTest(bento_tag=build.bento_tag, texts=len(texts), labels=labels, seconds_to_ready=round(seconds, 1))


def docker_engine_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def containerize_bento(build: BentoBuild) -> ContainerImage:
    """`bentoml containerize` into an image tagged like the Bento, when a Docker engine answers. Without one, the
    Bento and its generated Dockerfile stay ready for a machine that has Docker."""
    if not build.dockerfile.exists():
        raise BentoError(f"Bento {build.bento_tag} has no generated Dockerfile at {build.dockerfile}.")
    if not docker_engine_available():
        return ContainerImage(
            built=False,
            image=None,
            dockerfile=build.dockerfile,
            message=(
                f"No Docker engine is available here, so no image was built. The Bento {build.bento_tag} is ready: "
                f"run `bentoml containerize {build.bento_tag}` on a machine with Docker, or build "
                f"{build.dockerfile} with `docker build -f env/docker/Dockerfile {build.bento_dir}`."
            ),
        )
    done = subprocess.run(
        [bentoml_executable(), "containerize", build.bento_tag, "--image-tag", build.bento_tag],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )
    if done.returncode != 0:
        raise BentoError(f"`bentoml containerize {build.bento_tag}` failed:\n{_tail(done.stdout + done.stderr)}")
    return ContainerImage(
        built=True, image=build.bento_tag, dockerfile=build.dockerfile, message=f"Built image {build.bento_tag}."
    )


def find_bento(registered_model: str, version: int) -> str | None:
    """The newest Bento in the store built for this registered model version, if any."""
    import bentoml

    wanted = {"registered_model": registered_model, "model_version": str(version)}
    matches = [b for b in bentoml.bentos.list() if all(b.info.labels.get(k) == v for k, v in wanted.items())]
    return str(max(matches, key=lambda b: b.info.creation_time).tag) if matches else None


pick_smoke_texts_task = task(name="pick-smoke-texts")(pick_smoke_texts)
predict_labels_task = task(name="predict-with-registered-model")(predict_labels)
import_to_bento_store_task = task(name="import-to-bento-store")(import_to_bento_store)
build_bento_task = task(name="build-bento")(build_bento)
smoke_test_bento_task = task(name="smoke-test-bento")(smoke_test_bento)
containerize_bento_task = task(name="containerize-bento")(containerize_bento)
