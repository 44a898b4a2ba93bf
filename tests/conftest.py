from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import make_texts, make_tiny_bert

# No test may reach a hub: transformers, datasets and huggingface_hub stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def fixture_frame():
    return make_texts(per_class=40)


@pytest.fixture(scope="session")
def fixture_csv(tmp_path_factory, fixture_frame) -> Path:
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    fixture_frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, fixture_frame) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), fixture_frame["text"].tolist())
