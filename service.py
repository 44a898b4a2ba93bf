"""The BentoML service that serves the promoted champion.

Not implemented yet: it arrives with the promotion flow (issue 3). Until then the registered model is served
through MLflow: `mlflow.pyfunc.load_model("models:/<name>@candidate")`."""
