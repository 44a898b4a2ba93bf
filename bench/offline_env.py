"""Offline and quiet, for every benchmark: no Hugging Face hub look-ups and no telemetry. A benchmark imports
this module first, before transformers, datasets, MLflow or BentoML read these variables; the servers a benchmark
starts inherit them. Values already set in the environment win."""

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}

for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
