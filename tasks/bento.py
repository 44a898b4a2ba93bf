"""Put a fine-tuned model folder into the BentoML model store, labelled with its registered name and version."""

from __future__ import annotations

import shutil
from pathlib import Path


def import_to_bento_store(model_dir: Path, bento_model_name: str, registered_model: str, version: int) -> str:
    """Copy the model folder into a new BentoML model; return its tag (name:version)."""
    import bentoml

    labels = {"registered_model": registered_model, "model_version": str(version)}
    with bentoml.models.create(bento_model_name, labels=labels) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)
