#!/usr/bin/env python
"""The baseline for bench/serving_load.py: a plain, hand-made FastAPI + uvicorn service, the way most tutorials
write one. A `transformers.pipeline("text-classification", ...)` is loaded once at start-up and called once per
request in an ordinary (sync) FastAPI endpoint, which FastAPI runs in its thread pool. No batching across
requests, no queue, no limits.

Same request and response shape as our Bento's `classify`: POST /classify {"texts": [...]} ->
[{"label": ..., "probability": ...}, ...]. GET /health answers 200 once the model is loaded.

    .venv/bin/python bench/plain_fastapi_server.py --model-dir MODEL_DIR --port 8000
"""

from __future__ import annotations

import argparse

import offline_env  # noqa: F401  (first: no hub look-ups, no telemetry; see bench/offline_env.py)
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    texts: list[str]


class Prediction(BaseModel):
    label: str
    probability: float


def create_app(model_dir: str, max_length: int):
    import torch
    import transformers
    from fastapi import FastAPI

    classifier = transformers.pipeline(
        "text-classification", model=model_dir, truncation=True, max_length=max_length, device="cpu"
    )
    app = FastAPI(title="plain text classifier")

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    @app.post("/classify", response_model=list[Prediction])
    def classify(request: ClassifyRequest) -> list[dict]:
        return [{"label": r["label"], "probability": r["score"]} for r in classifier(request.texts)]

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A plain FastAPI + transformers pipeline text classifier.")
    parser.add_argument("--model-dir", required=True, help="A Hugging Face model folder with its tokenizer.")
    parser.add_argument("--max-length", type=int, default=128, help="Texts are truncated to this many tokens.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model_dir, args.max_length), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
