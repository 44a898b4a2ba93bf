"""The MLflow pyfunc wrapper around `TextClassifier`. `mlflow.pyfunc.load_model("models:/<name>@candidate")`
returns this: it predicts label strings (and probabilities) from raw texts."""

from __future__ import annotations

from typing import Any

from mlflow.pyfunc.model import PythonModel

from tasks.serving.classifier import TextClassifier, as_texts


class MlflowTextClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        self.classifier = TextClassifier(context.artifacts["model_dir"])

    # Left unannotated on purpose: MLflow reads predict's type hints to infer and enforce an input schema (an `Any`
    # hint is logged and validated as AnyType), which would change the logged model; its signature is explicit.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.classifier.predict(as_texts(model_input))
