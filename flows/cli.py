"""`textclf`: the command line. `textclf train` starts the embedded stack when needed, runs the training flow
and prints where to look; `textclf promote` gates the candidate and builds the champion's Bento; `textclf serve`
serves the champion on loopback; `textclf rollback` brings the previous champion back; `textclf score` scores new
texts with the champion; `textclf monitor` checks the champion's inputs for drift; `textclf stack up|down|status`
manages the embedded Prefect and MLflow servers (and stops the Bento server).

The options of the flow commands are generated from the flows' parameters (flows/cli_options.py): the same
fields, defaults, bounds and descriptions as the Prefect UI's run form."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from flows.cli_options import FlowOptions, HelpFormatter, parameter_field
from flows.settings import Settings

REGISTERED_MODEL_NOTE = "TEXTCLF_REGISTERED_MODEL_NAME, when set, replaces this default."


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


def _run_flow(settings: Settings, flow_fn: Callable[..., Any], **parameters: Any) -> Any:
    """Run a flow in-process against the (embedded or configured) servers; return its final state."""
    prefect_url, mlflow_uri = _stack_up(settings)
    # Not a settings read: the flow runs in this process and builds its own Settings() from the environment, so the
    # resolved tracking URI (the embedded server's when none was configured) is handed to it there.
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_url}):
        return flow_fn(**parameters, return_state=True)


def _failed(flow_name: str, state: Any, settings: Settings) -> int:
    ui = settings.resolved_prefect_api_url.removesuffix("/api")
    print(
        f"\nThe {flow_name} flow run ended {state.name}: {state.message}\n"
        f"See {ui}/runs/flow-run/{state.state_details.flow_run_id}",
        file=sys.stderr,
    )
    return 1


def _flow_parameters(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The flow's keyword arguments from the generated options; TEXTCLF_REGISTERED_MODEL_NAME (when set) is the
    default registered model of every command."""
    fallbacks = (
        {"registered_model_name": settings.registered_model_name}
        if "registered_model_name" in settings.model_fields_set
        else {}
    )
    values: dict[str, Any] = args.options.values(args, fallbacks)
    return values


def _ui(settings: Settings) -> str:
    return settings.resolved_prefect_api_url.removesuffix("/api")


def _mlflow_run_url(mlflow_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    experiment_id = MlflowClient(mlflow_uri).get_run(run_id).info.experiment_id
    return f"{mlflow_uri}/#/experiments/{experiment_id}/runs/{run_id}"


def _registers_a_candidate(flow_name: str, load: Callable[[], Any]) -> Callable[[argparse.Namespace], int]:
    """A command for a flow that registers a model version as @candidate (training, sweep): run it with the
    generated options, then print the version, its test scores and where to look."""

    def run(args: argparse.Namespace) -> int:
        settings = Settings()
        parameters = _flow_parameters(args, settings)
        started = time.perf_counter()
        state = _run_flow(settings, load(), **parameters)
        elapsed = time.perf_counter() - started
        mlflow_uri, ui = settings.resolved_mlflow_tracking_uri, _ui(settings)
        if not state.is_completed():
            return _failed(flow_name, state, settings)
        version = state.result()
        from mlflow import MlflowClient

        run = MlflowClient(mlflow_uri).get_run(version.run_id)
        experiment_id, metrics = run.info.experiment_id, run.data.metrics
        multi_label = "test_micro_f1" in metrics
        baseline = "one-vs-rest TF-IDF + logistic regression" if multi_label else "TF-IDF + logistic regression"
        micro = (
            f"  Test micro-F1:    {metrics['test_micro_f1']:.4f} (baseline: {metrics['baseline_micro_f1']:.4f})\n"
            if multi_label
            else ""
        )
        print(
            f"\nDone in {elapsed / 60:.1f} min.\n"
            f"  Registered model: {version.name} version {version.version}, alias @{version.alias}\n"
            f"  Test macro-F1:    {metrics.get('test_macro_f1', float('nan')):.4f} "
            f"({baseline} baseline: {metrics.get('baseline_macro_f1', float('nan')):.4f})\n"
            f"{micro}"
            f"  Load it:          mlflow.pyfunc.load_model('{version.alias_uri}')  (MLFLOW_TRACKING_URI={mlflow_uri})\n"
            f"  MLflow UI:        {mlflow_uri}/#/models/{version.name}\n"
            f"  MLflow run:       {mlflow_uri}/#/experiments/{experiment_id}/runs/{version.run_id}\n"
            f"  Prefect UI:       {ui}/runs/flow-run/{state.state_details.flow_run_id}\n"
        )
        from tasks.training.evaluate import improvement_hints

        for hint in improvement_hints(metrics):
            print(f"  Hint: {hint}")
        return 0

    return run


def _promote(args: argparse.Namespace) -> int:
    from flows.promotion import promotion

    settings = Settings()
    state = _run_flow(settings, promotion, **_flow_parameters(args, settings))
    if not state.is_completed():
        return _failed("promotion", state, settings)
    result = state.result()
    decision = result.decision
    print(
        f"\n{result.registered_model_name} version {decision.candidate_version}: {decision.label.upper()}\n"
        f"  Reason:    {decision.reason}\n"
        f"  Champion:  version {result.champion_version}   previous champion: version "
        f"{result.previous_champion_version}"
    )
    if result.bento is not None:
        print(
            f"  Bento:     {result.bento.bento_tag}  (Dockerfile {result.bento.dockerfile})\n"
            f"  Container: {result.bento.container_message}\n"
            f"  Serve it:  .venv/bin/textclf serve"
        )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from flows.promotion import rollback

    settings = Settings()
    state = _run_flow(settings, rollback, **_flow_parameters(args, settings))
    if not state.is_completed():
        return _failed("rollback", state, settings)
    result = state.result()
    print(
        f"\nRolled back {result.registered_model_name}: @champion is version {result.champion_version}, "
        f"@previous-champion version {result.previous_champion_version}.\n"
        f"  Bento: {result.bento.bento_tag}\n  Serve it: .venv/bin/textclf serve"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve the champion's Bento on loopback (replacing the one served before) and show a working request."""
    import json

    import httpx

    from flows.local_stack import serve_bento
    from tasks.contracts import CHAMPION_ALIAS
    from tasks.promotion.bento import find_bento
    from tasks.registry import resolve_alias

    settings = Settings()
    options = _flow_parameters(args, settings)
    _, mlflow_uri = _stack_up(settings)
    name = options.get("registered_model_name", settings.registered_model_name)
    champion = resolve_alias(mlflow_uri, name, CHAMPION_ALIAS)
    if champion is None:
        print(
            f"Registered model '{name}' has no @{CHAMPION_ALIAS} yet: run `.venv/bin/textclf promote` after "
            f"`.venv/bin/textclf train`.",
            file=sys.stderr,
        )
        return 1
    bento_tag = find_bento(name, champion)
    if bento_tag is None:
        print(
            f"No Bento in the BentoML store serves {name} version {champion} (the champion). Build it with "
            f"`.venv/bin/textclf promote --candidate-version {champion}` or `.venv/bin/textclf rollback`; "
            f"check BENTOML_HOME if you built it elsewhere.",
            file=sys.stderr,
        )
        return 1
    server = serve_bento(settings.root, bento_tag, settings.host, options.get("port", settings.bento_port))
    body = {"texts": ["Shares rose sharply after the bank reported record profits."]}
    token = settings.api_token.get_secret_value() if settings.api_token else None
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
    options = args.options.values(args).get("deploy", DeployOptions())
    names = deploy(prefect_url, options.pool_type, options.project_dir)
    ui = prefect_url.removesuffix("/api")
    print(
        f"\nWork pools 'gpu' and 'cpu' ({options.pool_type}) and deployments {', '.join(names)} are on {ui}.\n"
        f"  Start the workers (a GPU machine for 'gpu'; on a machine without one the fine-tune runs on the CPU):\n"
        f"    PREFECT_API_URL={prefect_url} .venv/bin/prefect worker start --pool cpu\n"
        f"    PREFECT_API_URL={prefect_url} .venv/bin/prefect worker start --pool gpu\n"
        f"  Run one from the UI: {ui}/deployments"
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


def _score(args: argparse.Namespace) -> int:
    from flows.batch_scoring import batch_scoring

    settings = Settings()
    parameters = _flow_parameters(args, settings)
    state = _run_flow(settings, batch_scoring, **parameters)
    if not state.is_completed():
        return _failed("batch-scoring", state, settings)
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id
    source = parameters["source"].source
    if summary.output_path is None:
        print(f"\nNothing to score: {source} holds no texts (a glob without a match is not an error).")
    else:
        labels = ", ".join(
            f"{label} {count}" for label, count in sorted(summary.label_counts.items(), key=lambda item: -item[1])
        )
        confidence = (
            ""
            if summary.mean_probability is None
            else f"  Confidence:   mean {summary.mean_probability:.3f}; {summary.low_confidence_share:.1%} "
            f"below the low-confidence threshold\n"
        )
        if summary.min_confidence is not None:
            confidence += (
                f"  Abstained:    {summary.abstained_texts} texts labelled 'unknown' (probability below "
                f"--min-confidence {summary.min_confidence:g})\n"
            )
        print(
            f"\nScored {summary.rows} texts from {source} with {summary.model_version} in {summary.seconds:.1f} s "
            f"({summary.texts_per_second:.0f} texts/s; {summary.blank_texts} blank, kept without a label).\n"
            f"  Predictions:  {summary.output_path}\n"
            f"  Labels:       {labels or 'none'}\n{confidence}"
            f"  Read them:    pandas.read_parquet('{summary.output_path}')"
        )
    mlflow_uri = settings.resolved_mlflow_tracking_uri
    from mlflow import MlflowClient

    experiment = MlflowClient(mlflow_uri).get_experiment_by_name(settings.monitoring_experiment_name)
    runs = (
        []
        if experiment is None
        else MlflowClient(mlflow_uri).search_runs(
            [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1
        )
    )
    if runs and experiment is not None:
        print(f"  MLflow run:   {mlflow_uri}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}")
    print(f"  Prefect UI:   {_ui(settings)}/runs/flow-run/{flow_run_id}")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from flows.monitoring import drift_monitoring

    settings = Settings()
    state = _run_flow(settings, drift_monitoring, **_flow_parameters(args, settings))
    if not state.is_completed():
        return _failed("drift-monitoring", state, settings)
    result = state.result()
    fired = [f"{t.title} ({t.effect_name} {t.effect:.3g} >= {t.threshold:g})" for t in result.tests if t.drift]
    lines = [
        f"\n{result.registered_model_name} version {result.model_version}: {result.status.upper().replace('_', ' ')}",
        f"  Reason:       {result.reason}",
        f"  Window:       {result.window_size} texts; reference (the champion's test split): "
        f"{result.reference_size} texts",
    ]
    if fired:
        lines.append(f"  Fired:        {'; '.join(fired)}")
    lines.append(f"  Report:       {result.report_path}")
    if result.event_id:
        lines.append(
            f"  Event:        textclf.drift.detected ({result.event_id}); notified: "
            f"{'yes' if result.notified else 'no (no notification block set; a WARNING was logged)'}"
        )
    if result.retraining_flow_run_id:
        lines.append(
            f"  Retraining:   {_ui(settings)}/runs/flow-run/{result.retraining_flow_run_id} "
            f"(on {result.retraining_dataset})"
        )
    lines += [
        f"  MLflow run:   {_mlflow_run_url(settings.resolved_mlflow_tracking_uri, result.mlflow_run_id)}",
        f"  Prefect UI:   {_ui(settings)}/runs/flow-run/{state.state_details.flow_run_id}",
    ]
    print("\n".join(lines))
    return 0


def _run_and_report(flow_name: str, load: Callable[[], Any]) -> Callable[[argparse.Namespace], int]:
    """A command for any flow: run it with the generated options, print its result and the flow run's URL."""

    def run(args: argparse.Namespace) -> int:
        settings = Settings()
        state = _run_flow(settings, load(), **_flow_parameters(args, settings))
        if not state.is_completed():
            return _failed(flow_name, state, settings)
        result = state.result()
        shown = result.model_dump_json(indent=2) if isinstance(result, BaseModel) else repr(result)
        print(
            f"\nThe {flow_name} flow run completed:\n{shown}\n"
            f"  Prefect UI:   {_ui(settings)}/runs/flow-run/{state.state_details.flow_run_id}"
        )
        return 0

    return run


class DeployOptions(BaseModel):
    pool_type: Literal["process", "docker", "kubernetes"] = Field(
        default="process", description="Work-pool type: process runs workers on this machine."
    )
    project_dir: str | None = Field(
        default=None,
        description="Where workers find the code; unset: this repository for process pools, "
        "/opt/textclf (the images' WORKDIR) for docker and kubernetes.",
    )


def _flow(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Command:
    """One `textclf` command. `options` adds its options (importing what it needs only when this command runs,
    so that `textclf stack status` does not import every flow)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    options: Callable[[FlowOptions], Any] | None = None
    available: Callable[[], bool] = lambda: True


def _serve_options(options: FlowOptions) -> None:
    from flows.promotion import promotion

    options.add_field(
        "registered_model_name", parameter_field(promotion, "registered_model_name"), note=REGISTERED_MODEL_NOTE
    )
    options.add_field(
        "port", Settings.model_fields["bento_port"], note="TEXTCLF_BENTO_PORT, when set, replaces this default."
    )


def _flow_options(module: str, name: str, **kwargs: Any) -> Callable[[FlowOptions], Any]:
    notes = {"registered_model_name": REGISTERED_MODEL_NOTE}
    return lambda options: options.add_flow(_flow(module, name)(), notes=notes, **kwargs)


COMMANDS = [
    Command(
        "train",
        "Run the training flow (starts the embedded stack if needed): the new version gets @candidate.",
        _registers_a_candidate("training", _flow("flows.training", "training")),
        _flow_options("flows.training", "training"),
    ),
    Command(
        "promote",
        "Gate @candidate against @champion; on a win build, check and containerize the Bento, then move @champion.",
        _promote,
        _flow_options(
            "flows.promotion",
            "promotion",
            exclude=("training_flow_run_id",),
            aliases={"gate.min_macro_f1_first_champion": ["--first-champion-floor"]},
        ),
    ),
    Command(
        "rollback",
        "Point @champion back at @previous-champion and rebuild its Bento.",
        _rollback,
        _flow_options("flows.promotion", "rollback"),
    ),
    Command("serve", "Serve the champion's Bento on loopback.", _serve, _serve_options),
    Command(
        "score",
        "Batch scoring: score new texts with @champion; predictions to Parquet, summary to MLflow.",
        _score,
        _flow_options("flows.batch_scoring", "batch_scoring"),
    ),
    Command(
        "monitor",
        "Drift monitoring: compare the champion's recent inputs (request log, or --source texts) with its test split.",
        _monitor,
        _flow_options("flows.monitoring", "drift_monitoring"),
    ),
    # Another flow is one entry: its parameters become the options, `_run_and_report` prints any result.
    Command(
        "sweep",
        "Hyperparameter sweep (Optuna) over the fine-tune; the best trial's model is registered as @candidate.",
        _registers_a_candidate("sweep", _flow("flows.sweep", "sweep")),
        _flow_options("flows.sweep", "sweep"),
        available=lambda: importlib.util.find_spec("flows.sweep") is not None,
    ),
    Command(
        "deploy",
        "Create the gpu and cpu work pools and register every deployment of prefect.yaml.",
        _deploy,
        lambda options: options.add_model("deploy", DeployOptions, default=DeployOptions(), title=""),
    ),
    Command("stack", "Manage the embedded Prefect and MLflow servers (and stop the Bento server).", _stack),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the options of the command named in `argv` (the others list only their help line)."""
    parser = argparse.ArgumentParser(prog="textclf", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for command in COMMANDS:
        if not command.available():
            continue
        sub = commands.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        sub.set_defaults(run=command.run, options=None)
        if command.name == "stack":
            sub.add_argument(
                "action",
                choices=["up", "down", "status"],
                help="up: start (or reuse) the servers; down: stop them and the Bento server; status: "
                "show whether they answer.",
            )
        if command.options is not None and command.name == chosen:
            options = FlowOptions(sub)
            command.options(options)
            sub.set_defaults(options=options)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
