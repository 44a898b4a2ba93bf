"""`textclf`: the command line. `textclf train` starts the embedded stack when needed, runs the training flow
and prints where to look; `textclf promote` gates the candidate and builds the champion's Bento; `textclf serve`
serves the champion on loopback; `textclf rollback` brings the previous champion back; `textclf stack
up|down|status` manages the embedded Prefect and MLflow servers (and stops the Bento server)."""

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


def _run_flow(settings: Settings, flow_fn, **parameters):
    """Run a flow in-process against the (embedded or configured) servers; return its final state."""
    prefect_url, mlflow_uri = _stack_up(settings)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # read by the flow's Settings()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_url}):
        return flow_fn(**parameters, return_state=True)


def _failed(flow_name: str, state, settings: Settings) -> int:
    ui = settings.resolved_prefect_api_url.removesuffix("/api")
    print(f"\nThe {flow_name} flow run ended {state.name}: {state.message}\n"
          f"See {ui}/runs/flow-run/{state.state_details.flow_run_id}", file=sys.stderr)
    return 1


def _train(args: argparse.Namespace) -> int:
    from flows.training import DatasetParameters, ModelParameters, TrainingParameters, training

    settings = Settings()
    dataset = DatasetParameters(source=args.source, text_column=args.text_column, label_column=args.label_column)
    model = ModelParameters(base_model=args.base_model, max_length=args.max_length)
    params = TrainingParameters(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate)
    started = time.perf_counter()
    state = _run_flow(settings, training, dataset=dataset, model=model, training=params,
                      registered_model_name=args.registered_model_name)
    elapsed = time.perf_counter() - started
    mlflow_uri, ui = settings.resolved_mlflow_tracking_uri, settings.resolved_prefect_api_url.removesuffix("/api")
    if not state.is_completed():
        return _failed("training", state, settings)
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


def _promote(args: argparse.Namespace) -> int:
    from flows.promotion import promotion
    from tasks.promote import GateConfig

    settings = Settings()
    gate = GateConfig(min_macro_f1_gain=args.min_macro_f1_gain, max_class_f1_drop=args.max_class_f1_drop,
                      min_macro_f1_first_champion=args.first_champion_floor)
    state = _run_flow(settings, promotion, registered_model_name=args.registered_model_name,
                      candidate_version=args.candidate_version, gate=gate)
    if not state.is_completed():
        return _failed("promotion", state, settings)
    result = state.result()
    decision = result.decision
    print(f"\n{result.registered_model_name} version {decision.candidate_version}: {decision.label.upper()}\n"
          f"  Reason:    {decision.reason}\n"
          f"  Champion:  version {result.champion_version}   previous champion: version "
          f"{result.previous_champion_version}")
    if result.bento is not None:
        print(f"  Bento:     {result.bento.bento_tag}  (Dockerfile {result.bento.dockerfile})\n"
              f"  Container: {result.bento.container_message}\n"
              f"  Serve it:  .venv/bin/textclf serve")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from flows.promotion import rollback

    settings = Settings()
    state = _run_flow(settings, rollback, registered_model_name=args.registered_model_name)
    if not state.is_completed():
        return _failed("rollback", state, settings)
    result = state.result()
    print(f"\nRolled back {result.registered_model_name}: @champion is version {result.champion_version}, "
          f"@previous-champion version {result.previous_champion_version}.\n"
          f"  Bento: {result.bento.bento_tag}\n  Serve it: .venv/bin/textclf serve")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve the champion's Bento on loopback (replacing the one served before) and show a working request."""
    import json

    import httpx

    from flows.local_stack import serve_bento
    from tasks.bento import find_bento
    from tasks.promote import CHAMPION_ALIAS, resolve_alias

    settings = Settings()
    _, mlflow_uri = _stack_up(settings)
    name = args.registered_model_name
    champion = resolve_alias(mlflow_uri, name, CHAMPION_ALIAS)
    if champion is None:
        print(f"Registered model '{name}' has no @{CHAMPION_ALIAS} yet: run `.venv/bin/textclf promote` after "
              f"`.venv/bin/textclf train`.", file=sys.stderr)
        return 1
    bento_tag = find_bento(name, champion)
    if bento_tag is None:
        print(f"No Bento in the BentoML store serves {name} version {champion} (the champion). Build it with "
              f"`.venv/bin/textclf promote --candidate-version {champion}` or `.venv/bin/textclf rollback`; "
              f"check BENTOML_HOME if you built it elsewhere.", file=sys.stderr)
        return 1
    server = serve_bento(settings.root, bento_tag, settings.host, args.port or settings.bento_port)
    body = {"texts": ["Shares rose sharply after the bank reported record profits."]}
    token = os.environ.get("TEXTCLF_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.post(f"{server.url}/classify", json=body, headers=headers, timeout=60)
    auth = ' -H "Authorization: Bearer $TEXTCLF_API_TOKEN"' if token else ""
    print(
        f"\nServing {name} version {champion} (Bento {bento_tag}) at {server.url}  (log {server.log_path})\n"
        f"  Swagger UI:  {server.url}/      OpenAPI: {server.url}/docs.json      Metrics: {server.url}/metrics\n"
        f"  Try it:\n"
        f"    curl -s -X POST {server.url}/classify -H 'Content-Type: application/json'{auth} \\\n"
        f"         -d '{json.dumps(body)}'\n"
        f"  Answer ({answer.status_code}): {answer.text}\n"
        f"  Stop it:     .venv/bin/textclf stack down"
    )
    return 0 if answer.status_code == 200 else 1


def _deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    settings = Settings()
    prefect_url, _ = _stack_up(settings)
    names = deploy(prefect_url, args.pool_type, args.project_dir)
    ui = prefect_url.removesuffix("/api")
    print(f"\nWork pools 'gpu' and 'cpu' ({args.pool_type}) and deployments {', '.join(names)} are on {ui}.\n"
          f"  Start the workers (a GPU machine for 'gpu'; on a machine without one the fine-tune runs on the CPU):\n"
          f"    PREFECT_API_URL={prefect_url} .venv/bin/prefect worker start --pool cpu\n"
          f"    PREFECT_API_URL={prefect_url} .venv/bin/prefect worker start --pool gpu\n"
          f"  Run one from the UI: {ui}/deployments")
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
    default_name = Settings().registered_model_name
    promote = commands.add_parser("promote", help="Gate @candidate against @champion; on a win build, check and "
                                                   "containerize the Bento, then move @champion.")
    promote.add_argument("--registered-model-name", default=default_name)
    promote.add_argument("--candidate-version", type=int, default=None,
                         help="Version to gate (default: the one behind @candidate).")
    promote.add_argument("--min-macro-f1-gain", type=float, default=0.0)
    promote.add_argument("--max-class-f1-drop", type=float, default=0.05)
    promote.add_argument("--first-champion-floor", type=float, default=0.5,
                         help="Macro-F1 the first champion needs when there is none yet.")
    promote.set_defaults(run=_promote)
    rollback = commands.add_parser("rollback", help="Point @champion back at @previous-champion and rebuild its Bento.")
    rollback.add_argument("--registered-model-name", default=default_name)
    rollback.set_defaults(run=_rollback)
    serve = commands.add_parser("serve", help="Serve the champion's Bento on loopback (default port 3000).")
    serve.add_argument("--registered-model-name", default=default_name)
    serve.add_argument("--port", type=int, default=None, help="Port (default TEXTCLF_BENTO_PORT or 3000).")
    serve.set_defaults(run=_serve)
    deploy = commands.add_parser("deploy", help="Create the gpu and cpu work pools and register every deployment "
                                                 "of prefect.yaml.")
    deploy.add_argument("--pool-type", choices=["process", "docker", "kubernetes"], default="process",
                        help="Work-pool type (default: process, workers on this machine).")
    deploy.add_argument("--project-dir", default=None,
                        help="Where workers find the code (default: this repository; /opt/textclf in the images).")
    deploy.set_defaults(run=_deploy)
    stack = commands.add_parser("stack", help="Manage the embedded Prefect and MLflow servers.")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(run=_stack)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
