"""The MLflow pyfunc wrapper around `TextClassifier`. `mlflow.pyfunc.load_model("models:/<name>@candidate")`
returns this: it predicts label strings (and probabilities) from raw texts."""

from __future__ import annotations

import mlflow.pyfunc

from tasks.serving.classifier import TextClassifier, as_texts


class MlflowTextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.classifier = TextClassifier(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        return self.classifier.predict(as_texts(model_input))
