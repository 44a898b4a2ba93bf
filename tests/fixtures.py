"""Test data and a tiny randomly initialised BERT, made here so no test needs the network."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "striker", "season", "referee", "stadium", "cup"],
    "tech": ["software", "chip", "laptop", "network", "cloud", "robot", "server", "startup", "app", "data"],
    "food": ["recipe", "oven", "flour", "pasta", "sauce", "dinner", "chef", "garlic", "soup", "bread"],
}
FILLER = ["the", "a", "new", "big", "today", "after", "with", "and", "was", "very", "our", "late"]


def make_texts(per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Short synthetic texts whose label follows from their topic words (so even a tiny model can learn it)."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        seen = set()
        while len(seen) < per_class:
            n = rng.randint(4, 14)
            tokens = [rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n)]
            tokens[0] = rng.choice(words)
            text = " ".join(tokens)
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_multi_label_texts(per_combination: int = 25, seed: int = 0) -> pd.DataFrame:
    """Short synthetic texts about one or two topics (or none: filler only), labelled with the list of their topics,
    so that a tiny model can learn which topics a text mentions."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    combinations = [[t] for t in topics] + [[a, b] for i, a in enumerate(topics) for b in topics[i + 1 :]] + [[]]
    rows, seen = [], set()
    for labels in combinations:
        made = 0
        while made < per_combination:
            tokens = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            for topic in labels:
                tokens += [rng.choice(TOPICS[topic]) for _ in range(rng.randint(2, 4))]
            rng.shuffle(tokens)
            text = " ".join(tokens)
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "labels": labels})
                made += 1
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_tiny_bert(folder: Path, texts: list[str]) -> Path:
    """A 2-layer BERT with a whole-word vocabulary made from the fixture texts. Seconds on a CPU, and the same
    model every time (sorted vocabulary, seeded weights), so tests that train it are deterministic."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({word for text in texts for word in text.lower().split()} | set(FILLER))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


def flow_run_and_artifacts(api_url: str, flow_run_id) -> tuple[dict, list[dict]]:
    """What the Prefect UI shows for a flow run, read over the same REST API the UI uses."""
    import httpx

    run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}").raise_for_status().json()
    artifacts = (
        httpx.post(f"{api_url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}})
        .raise_for_status()
        .json()
    )
    return run, artifacts


def relabelled_model(tuned, folder: Path, relabel) -> object:
    """The same fine-tuned weights with `labels.json` rewritten: the model's predictions get other names."""
    shutil.copytree(tuned.model_dir, folder)
    labels = json.loads((folder / "labels.json").read_text())
    (folder / "labels.json").write_text(json.dumps(relabel(labels)))
    return tuned.model_copy(update={"model_dir": folder})


def register_model_versions(
    servers, prepared_fixture, tuned_fixture, tmp_path, name: str, variants: list[str]
) -> list[int]:
    """Register one version per variant of the tuned fixture model: "good" (as trained), "fair" (two classes'
    names swapped, macro-F1 about 1/3) or "worse" (every class renamed, macro-F1 0)."""
    from tasks.tracking import start_tracking_run
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.register import RegisterConfig, register

    snapshot, prepared = prepared_fixture
    relabel = {
        "good": lambda labels: labels,
        "fair": lambda labels: [labels[1], labels[0], *labels[2:]],  # two classes swapped
        "worse": lambda labels: labels[1:] + labels[:1],  # every class wrong
    }
    versions = []
    for index, variant in enumerate(variants):
        model = relabelled_model(tuned_fixture, tmp_path / f"{variant}-{index}", relabel[variant])
        evaluation = evaluate(model, prepared, tmp_path / f"eval-{index}", config=EvaluationConfig(latency_samples=1))
        tracking = start_tracking_run(servers["mlflow"], f"{name}-training", "train", idempotency_key=f"{name}-{index}")
        version = register(
            model,
            evaluation,
            snapshot,
            prepared,
            tracking,
            RegisterConfig(registered_model_name=name),
            {"variant": variant},
            "test",
        )
        versions.append(version.version)
    return versions


def serve_from_repository(env: dict, log: Path, timeout_seconds: float = 180):
    """`bentoml serve service:TextClassifierService` from the repository on a free loopback port, in its own
    process group, waited on until `/readyz` answers 200. Returns (process, url); stop it with
    `tasks.promotion.bento.stop_bento_server(process.pid)`."""
    import sys

    from tasks.common.ports import free_port
    from tasks.common.processes import start_process
    from tasks.promotion.bento import stop_bento_server, wait_until_ready, with_own_metrics_folder

    port = free_port()
    bentoml = str(Path(sys.executable).parent / "bentoml")
    command = [bentoml, "serve", "service:TextClassifierService", "--host", "127.0.0.1", "--port", str(port)]
    env = with_own_metrics_folder(dict(env), log.with_name(f"{log.stem}.bentoml-home"))  # as the product's servers
    process = start_process(command, log, env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log, timeout_seconds)
    except BaseException:
        stop_bento_server(process.pid)
        raise
    return process, url


@contextlib.contextmanager
def service_in_process(model_tag: str, **settings: str) -> Iterator[TestClient]:
    """The service's own ASGI app (BentoML's `to_asgi()`, the app `bentoml serve` runs), in this process, with its
    start-up and shut-down: for input validation, auth and documentation tests, which need BentoML's request handling
    and the service's middlewares but not a server process. `settings` are TEXTCLF_* variables for this app only.

    service.py reads its settings at import, so each app imports its own copy of the module. BentoML registers its
    Prometheus series when an app starts; a process can hold one set, so the previous app's series are dropped first
    (Prometheus metrics are checked through a real `bentoml serve`)."""
    import importlib.util
    import os
    import sys
    import uuid

    from bentoml._internal.configuration.containers import BentoMLContainer
    from starlette.testclient import TestClient

    registry = BentoMLContainer.metrics_client.get().registry
    for collector in list(registry._collector_to_names):  # BentoML 1.4 offers no public way to reset its registry
        registry.unregister(collector)
    name = f"service_in_process_{uuid.uuid4().hex[:8]}"
    environment = {"TEXTCLF_BENTO_MODEL": model_tag, "TEXTCLF_REQUEST_LOG": "false", **settings}
    saved = dict(os.environ)
    os.environ.update(environment)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "service.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the module's annotations through sys.modules
        spec.loader.exec_module(module)
        app = module.SERVICE.to_asgi()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            yield client
    finally:
        sys.modules.pop(name, None)


ROOT = Path(__file__).resolve().parents[1]


def run_without_gpu(code: str) -> subprocess.CompletedProcess[str]:
    """Python `code` in a child that sees no GPU (CUDA_VISIBLE_DEVICES=""), so a CPU check holds on a GPU machine."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


_FINE_TUNE_CHILD = (
    "import sys; from pathlib import Path\n"
    "from tasks.training.fine_tune import FineTuneConfig, fine_tune\n"
    "from tasks.contracts import PreparedDataset\n"
    "fine_tune(PreparedDataset.model_validate_json(sys.argv[1]), FineTuneConfig.model_validate_json(sys.argv[2]),"
    " Path(sys.argv[3]))\n"
)


def fine_tune_until_first_checkpoint(prepared, config, output_root: Path, log: Path) -> subprocess.Popen[bytes]:
    """`fine_tune` in a child process (its stderr to `log`), returned once its first complete checkpoint exists, so
    the caller can kill it mid-run."""
    from tasks.training.fine_tune import last_complete_checkpoint, run_key

    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FINE_TUNE_CHILD,
            prepared.model_dump_json(),
            config.model_dump_json(),
            str(output_root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        cwd=ROOT,
    )
    checkpoints = output_root / run_key(prepared, config) / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while last_complete_checkpoint(checkpoints) is None:
            assert process.poll() is None, f"the fine-tune ended before it was interrupted: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process
