"""`textclf`: the command line. `textclf train` starts the embedded stack when needed, runs the training flow
and prints where to look; `textclf stack up|down|status` manages the embedded Prefect and MLflow servers."""

from __future__ import annotations

import argparse
import os
import sys
import time

from flows.settings import Settings


def _stack_up(settings: Settings) -> tuple[str, str]:
    """Start (or reuse) the embedded servers that are not overridden; return (Prefect API URL, MLflow URI)."""
    from flows.local_stack import ensure_mlflow_server, ensure_prefect_server

    prefect_url, mlflow_uri = settings.resolved_prefect_api_url, settings.resolved_mlflow_tracking_uri
    if settings.uses_embedded_prefect:
        server = ensure_prefect_server(settings.root, settings.host, settings.prefect_port)
        print(f"Prefect server  {'started' if server.started else 'running'}: {server.ui_url}  (log {server.log_path})")
    if settings.uses_embedded_mlflow:
        server = ensure_mlflow_server(settings.root, settings.host, settings.mlflow_port)
        print(f"MLflow server   {'started' if server.started else 'running'}: {server.ui_url}  (log {server.log_path})")
    return prefect_url, mlflow_uri


def _train(args: argparse.Namespace) -> int:
    settings = Settings()
    prefect_url, mlflow_uri = _stack_up(settings)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # read by the flow's Settings()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training import DatasetParameters, ModelParameters, TrainingParameters, training

    dataset = DatasetParameters(source=args.source, text_column=args.text_column, label_column=args.label_column)
    model = ModelParameters(base_model=args.base_model, max_length=args.max_length)
    params = TrainingParameters(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate)
    started = time.perf_counter()
    # Prefect has loaded its settings already (at import): point this run at the server explicitly.
    with temporary_settings(updates={PREFECT_API_URL: prefect_url}):
        state = training(dataset, model, params, registered_model_name=args.registered_model_name, return_state=True)
    elapsed = time.perf_counter() - started
    ui = prefect_url.removesuffix("/api")
    if not state.is_completed():
        print(f"\nThe training flow ended {state.name}: {state.message}\nSee {ui}/runs", file=sys.stderr)
        return 1
    version = state.result()
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_uri).get_run(version.run_id)
    experiment_id, metrics = run.info.experiment_id, run.data.metrics
    print(
        f"\nDone in {elapsed / 60:.1f} min.\n"
        f"  Registered model: {version.name} version {version.version}, alias @{version.alias}\n"
        f"  Test macro-F1:    {metrics.get('test_macro_f1', float('nan')):.4f} "
        f"(TF-IDF + logistic regression baseline: {metrics.get('baseline_macro_f1', float('nan')):.4f})\n"
        f"  Load it:          mlflow.pyfunc.load_model('{version.alias_uri}')  (MLFLOW_TRACKING_URI={mlflow_uri})\n"
        f"  MLflow UI:        {mlflow_uri}/#/models/{version.name}\n"
        f"  MLflow run:       {mlflow_uri}/#/experiments/{experiment_id}/runs/{version.run_id}\n"
        f"  Prefect UI:       {ui}/runs/flow-run/{state.state_details.flow_run_id}\n"
    )
    return 0


def _stack(args: argparse.Namespace) -> int:
    from flows.local_stack import is_healthy, stop_local_servers

    settings = Settings()
    if args.action == "up":
        _stack_up(settings)
    elif args.action == "down":
        print("stopped:", ", ".join(stop_local_servers(settings.root)) or "nothing")
    else:
        prefect, mlflow = settings.resolved_prefect_api_url, settings.resolved_mlflow_tracking_uri
        print(f"Prefect {prefect}: {'up' if is_healthy(prefect + '/health') else 'down'}")
        print(f"MLflow  {mlflow}: {'up' if is_healthy(mlflow + '/health', 'OK') else 'down'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from flows.training import PACKAGED_BASE_MODEL

    parser = argparse.ArgumentParser(prog="textclf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Run the training flow (starts the embedded stack if needed).")
    train.add_argument("--source", default="bbc-news", help="Dataset source (default: bbc-news, packaged).")
    train.add_argument("--text-column", default="text")
    train.add_argument("--label-column", default="label")
    train.add_argument("--base-model", default=PACKAGED_BASE_MODEL)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--registered-model-name", default=Settings().registered_model_name)
    train.set_defaults(run=_train)
    stack = commands.add_parser("stack", help="Manage the embedded Prefect and MLflow servers.")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(run=_stack)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
