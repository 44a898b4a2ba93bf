"""The promotion flow: gate a candidate model version against the current champion on the candidate's held-out
test split; when the candidate wins, choose its inference runtime (ONNX int8 / fp32 / PyTorch, each gated on the
same test split against the registered PyTorch model), build the Bento that serves it, serve it on loopback and
check its answers, and only then move `@champion` (and `@previous-champion`). And the rollback flow: the previous
champion back (with the runtime its promotion chose), rebuilt and checked the same way. Wiring only; the stages are
in `tasks/promotion/gate.py`, `tasks/promotion/optimize_runtime.py` and `tasks/promotion/bento.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.settings import Settings
from tasks.contracts import CANDIDATE_ALIAS, CHAMPION_ALIAS, PREVIOUS_CHAMPION_ALIAS, REGISTERED_MODEL_NAME
from tasks.promotion.bento import (
    BENTO_MODEL_NAME,
    BentoBuild,
    build_bento_task,
    containerize_bento_task,
    import_to_bento_store_task,
    pick_smoke_texts_task,
    predict_labels_task,
    smoke_test_bento_task,
)
from tasks.promotion.gate import (
    GateConfig,
    GateDecision,
    decide_task,
    record_decision_task,
    record_failure,
    score_versions_task,
)
from tasks.promotion.optimize_runtime import (
    RuntimeGate,
    RuntimeGateConfig,
    optimize_runtime_task,
    record_runtime_task,
    runtime_markdown,
)
from tasks.promotion.scores import TestScores
from tasks.registry import (
    download_model_version_task,
    fetch_test_split_task,
    move_aliases_task,
    resolve_alias_task,
    rollback_task,
    version_of_flow_run_task,
)
from tasks.tracking import finished_on_exit, start_tracking_run_task

RegisteredModelName = Annotated[str, Field(min_length=1, max_length=256, description="MLflow registered-model name.")]
SmokeTestTexts = Annotated[
    int, Field(ge=1, le=64, description="Test texts the built Bento must classify like the registered model.")
]
SmokeTestTimeout = Annotated[
    int, Field(ge=1, le=3600, description="Seconds the built Bento may take to become ready in the smoke test.")
]
Containerize = Annotated[
    bool,
    Field(
        description="Run `bentoml containerize` after the build (needs a Docker engine; skipped with a "
        "message when there is none)."
    ),
]


class ServedBento(BaseModel):
    """The Bento that now serves the champion."""

    model_config = ConfigDict(frozen=True)

    bento_tag: str
    model_version: int
    runtime: str
    dockerfile: Path
    container_image: str | None
    container_message: str


class PromotionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    registered_model_name: str
    decision: GateDecision
    champion_version: int | None
    previous_champion_version: int | None
    bento: ServedBento | None = None
    runtime: RuntimeGate | None = None  # the runtime gate's figures and choice (promoted candidates only)


class RollbackResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    registered_model_name: str
    champion_version: int
    previous_champion_version: int | None
    bento: ServedBento


def decision_markdown(
    name: str,
    decision: GateDecision,
    scores: dict[int, TestScores],
    runtime: RuntimeGate | None = None,
    runtime_config: RuntimeGateConfig = RuntimeGateConfig(),
) -> str:
    rows = [f"| version {v} | {s.macro_f1:.4f} | {s.accuracy:.4f} | {s.n} |" for v, s in scores.items()]
    lines = [
        f"# Promotion of {name} version {decision.candidate_version}: **{decision.label}**",
        "",
        decision.reason,
        "",
        "| model | test macro-F1 | accuracy | texts |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    if decision.per_class_f1_delta:
        lines += ["| class | F1 change (candidate - champion) |", "|---|---|"]
        lines += [f"| {label} | {delta:+.4f} |" for label, delta in sorted(decision.per_class_f1_delta.items())]
        lines.append("")
    if runtime is not None:
        lines.append(runtime_markdown(runtime, runtime_config))
    return "\n".join(lines) + "\n"


def build_and_check_bento(
    tracking_uri: str,
    name: str,
    version: int,
    test_split: Path,
    smoke_test_texts: int,
    smoke_test_timeout: int,
    settings: Settings,
) -> BentoBuild:
    """Model store -> Bento -> served on loopback -> answers equal the registered pyfunc model's. Raises on any
    failure, before any alias has moved."""
    downloaded = download_model_version_task(tracking_uri, name, version, settings.model_download_dir)
    texts = pick_smoke_texts_task(test_split, smoke_test_texts)
    expected = predict_labels_task(downloaded, texts)
    model_tag = import_to_bento_store_task(downloaded.model_dir, BENTO_MODEL_NAME, name, version)
    build = build_bento_task(model_tag, name, version)
    smoke_test_bento_task(build, texts, expected, settings.logs_dir, smoke_test_timeout)
    return build


def served_bento(build: BentoBuild, containerize: bool) -> ServedBento:
    if not containerize:
        return ServedBento(
            bento_tag=build.bento_tag,
            model_version=build.model_version,
            runtime=build.runtime,
            dockerfile=build.dockerfile,
            container_image=None,
            container_message="containerize=False: no image built.",
        )
    image = containerize_bento_task(build)
    get_run_logger().info(image.message)
    return ServedBento(
        bento_tag=build.bento_tag,
        model_version=build.model_version,
        runtime=build.runtime,
        dockerfile=image.dockerfile,
        container_image=image.image,
        container_message=image.message,
    )


@flow(name="promotion", log_prints=True)
def promotion(
    registered_model_name: RegisteredModelName = REGISTERED_MODEL_NAME,
    candidate_version: Annotated[
        int | None, Field(ge=1, description="Model version to gate; empty means the version behind @candidate.")
    ] = None,
    training_flow_run_id: Annotated[
        str | None,
        Field(
            description="Gate the version this training flow run registered (what the automation "
            "after training passes); overrides candidate_version."
        ),
    ] = None,
    gate: GateConfig = GateConfig(),
    runtime: RuntimeGateConfig = RuntimeGateConfig(),
    smoke_test_texts: SmokeTestTexts = 16,
    smoke_test_timeout_seconds: SmokeTestTimeout = 300,
    containerize: Containerize = True,
) -> PromotionResult:
    settings = Settings()
    uri, name = settings.resolved_mlflow_tracking_uri, registered_model_name
    found: int | None
    if training_flow_run_id:
        found = version_of_flow_run_task(uri, name, training_flow_run_id)
    else:
        found = candidate_version or resolve_alias_task(uri, name, CANDIDATE_ALIAS)
    if found is None:
        raise ValueError(
            f"Registered model '{name}' has no @{CANDIDATE_ALIAS} version: train one first (`textclf train`), "
            f"or pass candidate_version."
        )
    candidate: int = found
    champion = resolve_alias_task(uri, name, CHAMPION_ALIAS)
    tracking = start_tracking_run_task(
        uri,
        settings.promotion_experiment_name,
        run_name=f"{name}-v{candidate}",
        idempotency_key=flow_run.get_id() or f"local-{name}-{candidate}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "registered_model": name},
    )
    with finished_on_exit(tracking, on_failure=lambda error: record_failure(uri, name, candidate, error)):
        test_split = fetch_test_split_task(uri, name, candidate, settings.promotion_dir / tracking.run_id)
        # The candidate is downloaded once: the gate scores it from the folder the runtime gate and the Bento use.
        downloaded = download_model_version_task(uri, name, candidate, settings.model_download_dir)
        scores = score_versions_task(
            uri,
            name,
            [v for v in (candidate, champion) if v is not None],
            test_split,
            downloaded={candidate: downloaded.pyfunc_dir},
        )
        decision = decide_task(
            scores[candidate], scores.get(champion) if champion is not None else None, gate, candidate, champion
        )
        record_decision_task(tracking, name, decision, gate)
        runtime_gate = None
        if decision.promote:  # the runtime the Bento, batch scoring and monitoring will answer with
            runtime_gate = optimize_runtime_task(
                downloaded.model_dir, test_split, settings.promotion_dir / tracking.run_id / "runtime", runtime
            )
            record_runtime_task(tracking, name, candidate, runtime_gate, runtime)
            print(f"Inference runtime: {runtime_gate.reason}")
        create_markdown_artifact(
            key="promotion-decision",
            markdown=decision_markdown(name, decision, scores, runtime_gate, runtime),
            description=f"Gate decision for {name} version {candidate}.",
        )
        print(f"{name} version {candidate}: {decision.label}. {decision.reason}")
        result = PromotionResult(
            registered_model_name=name,
            decision=decision,
            champion_version=champion,
            previous_champion_version=resolve_alias_task(uri, name, PREVIOUS_CHAMPION_ALIAS),
        )
        if decision.promote:
            build = build_and_check_bento(
                uri, name, candidate, test_split, smoke_test_texts, smoke_test_timeout_seconds, settings
            )
            previous, new_champion = move_aliases_task(uri, name, candidate)
            print(
                f"@{CHAMPION_ALIAS} -> version {new_champion}; @{PREVIOUS_CHAMPION_ALIAS} -> version {previous}; "
                f"Bento {build.bento_tag}"
            )
            result = PromotionResult(
                registered_model_name=name,
                decision=decision,
                champion_version=new_champion,
                previous_champion_version=previous,
                bento=served_bento(build, containerize),
                runtime=runtime_gate,
            )
    return result


@flow(name="rollback", log_prints=True)
def rollback(
    registered_model_name: RegisteredModelName = REGISTERED_MODEL_NAME,
    smoke_test_texts: SmokeTestTexts = 16,
    smoke_test_timeout_seconds: SmokeTestTimeout = 300,
    containerize: Containerize = True,
) -> RollbackResult:
    settings = Settings()
    uri, name = settings.resolved_mlflow_tracking_uri, registered_model_name
    previous = resolve_alias_task(uri, name, PREVIOUS_CHAMPION_ALIAS)
    if previous is None:
        raise ValueError(
            f"Registered model '{name}' has no @{PREVIOUS_CHAMPION_ALIAS}: there is no former champion to roll back "
            f"to (a rollback needs at least one promotion that replaced a champion)."
        )
    test_split = fetch_test_split_task(uri, name, previous, settings.promotion_dir / f"rollback-{flow_run.get_id()}")
    build = build_and_check_bento(
        uri, name, previous, test_split, smoke_test_texts, smoke_test_timeout_seconds, settings
    )
    champion, demoted = rollback_task(uri, name)
    print(
        f"Rolled back: @{CHAMPION_ALIAS} -> version {champion}; @{PREVIOUS_CHAMPION_ALIAS} -> version {demoted}; "
        f"Bento {build.bento_tag}"
    )
    create_markdown_artifact(
        key="rollback",
        description=f"Rollback of {name}.",
        markdown=f"# Rollback of {name}\n\n@{CHAMPION_ALIAS} is version **{champion}** again (Bento "
        f"`{build.bento_tag}`); version {demoted} is now @{PREVIOUS_CHAMPION_ALIAS}.\n",
    )
    return RollbackResult(
        registered_model_name=name,
        champion_version=champion,
        previous_champion_version=demoted,
        bento=served_bento(build, containerize),
    )
