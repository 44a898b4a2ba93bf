"""A hub model id as base model, with a local stand-in for the hub: the tiny BERT laid out in a Hugging Face
cache folder, read with HF_HUB_OFFLINE=1 (the network is never used; a real hub is not reachable here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "textclf-test/tiny-bert"
REVISION = "0" * 40


def make_hub_cache(cache: Path, model_dir: Path) -> None:
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


def test_hub_model_id_is_fine_tuned_from_the_cache(tmp_path, tiny_model_dir, prepared_fixture):
    make_hub_cache(tmp_path / "hub", tiny_model_dir)
    snapshot, _ = prepared_fixture
    script = (
        "import sys; from pathlib import Path\n"
        "from tasks.training.ingest import DatasetSnapshot\n"
        "from tasks.training.preprocess import PreprocessConfig, preprocess\n"
        "from tasks.training.fine_tune import FineTuneConfig, fine_tune\n"
        "snapshot = DatasetSnapshot.model_validate_json(sys.argv[1])\n"
        f"prepared = preprocess(snapshot, PreprocessConfig(tokenizer={REPO_ID!r}, max_length=32), Path(sys.argv[2]))\n"
        f"tuned = fine_tune(prepared, FineTuneConfig(base_model={REPO_ID!r}, epochs=1, batch_size=8), Path(sys.argv[2]))\n"
        "print('MODEL', tuned.model_dir, tuned.global_step)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, snapshot.model_dump_json(), str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("MODEL ")][0]
    model_dir, steps = line.split()[1:]
    assert int(steps) > 0 and (Path(model_dir) / "model.safetensors").exists()


def test_unknown_hub_model_fails_with_its_name(tmp_path, prepared_fixture):
    snapshot, _ = prepared_fixture
    script = (
        "import sys; from pathlib import Path\n"
        "from tasks.training.ingest import DatasetSnapshot\n"
        "from tasks.training.preprocess import PreprocessConfig, preprocess\n"
        "preprocess(DatasetSnapshot.model_validate_json(sys.argv[1]), "
        "PreprocessConfig(tokenizer='no-such-org/no-such-model'), Path(sys.argv[2]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, snapshot.model_dump_json(), str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "no-such-org/no-such-model" in done.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
