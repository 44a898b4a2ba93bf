"""User journeys in a real browser (headless Chromium driven by Playwright) on the production-shaped stack of
`production_stack`: a Prefect server and an MLflow server on PostgreSQL, every deployment of prefect.yaml
registered, a `process` worker on each pool.

The journey is what a user does by hand: in the Prefect UI open Deployments -> training -> Run -> Custom run, type
the parameters into the deployment's form, submit, and watch the flow run until it shows "Completed"; the automation
then runs the promotion deployment by itself (with this run's id: the training run's @candidate, registered by
exactly this flow run, becomes @champion); in the MLflow UI the registered model shows version 1 as @champion, and
its training run shows its metrics and the evaluation plots. (tests/test_deployments.py checks the registered
deployments and schedules on the same stack.)

The browser is the system's Chromium (Debian's `chromium` package; CI installs it); Playwright never downloads one.
A full-page screenshot of every step goes to test-artifacts/ui/ at the repository root, or to
$TEXTCLF_TEST_ARTIFACTS/ui/ when that variable is set; a failing journey also leaves failure.png and a Playwright
trace (trace.zip, open it with `playwright show-trace`) there."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tasks.contracts import CANDIDATE_ALIAS, CHAMPION_ALIAS
from tasks.registry import resolve_alias

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL_NAME = "ui-topics"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TRAINING_TIMEOUT_S = 600
PROMOTION_TIMEOUT_S = 600
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def artifacts_dir() -> Path:
    root = os.environ.get("TEXTCLF_TEST_ARTIFACTS")
    return (Path(root) if root else REPO / "test-artifacts") / "ui"


def chromium_executable() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not found:
        pytest.fail(
            "No Chromium found (`chromium` on PATH or /usr/bin/chromium). The browser journeys drive the "
            "system's Chromium and never download one: install Debian's `chromium` package "
            "(`apt-get install chromium`; CI installs it)."
        )
    return found


class Journey:
    """The browser page plus numbered full-page screenshots of each step."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.count, self.finished = page, folder, 0, False

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def finish(self) -> None:
        """The journey's last step passed (otherwise the fixture keeps failure.png and the trace)."""
        self.finished = True


@pytest.fixture(scope="session")
def chromium() -> str:
    """Listed first by the journeys, so that a missing browser fails them before the stack is started."""
    return chromium_executable()


@pytest.fixture()
def journey(chromium):
    from playwright.sync_api import expect, sync_playwright

    folder = artifacts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("*.png"), folder / "trace.zip"]:  # only this journey's files from an earlier run
        stale.unlink(missing_ok=True)
    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_default_timeout(60_000)
        context.set_default_navigation_timeout(90_000)
        context.tracing.start(screenshots=True, snapshots=True)
        page = context.new_page()
        steps = Journey(page, folder)
        try:
            yield steps
        finally:
            try:
                if not steps.finished:
                    page.screenshot(path=str(folder / "failure.png"), full_page=True)
                    context.tracing.stop(path=str(folder / "trace.zip"))
                else:
                    context.tracing.stop()
            finally:
                context.close()
                browser.close()


# --- the Prefect REST API, to cross-check what the UI showed -----------------------------------------------------


def _deployment(api: str, flow: str, name: str) -> dict:
    return httpx.get(f"{api}/deployments/name/{flow}/{name}").raise_for_status().json()


def _flow_run(api: str, flow_run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}").raise_for_status().json()


def _wait_for(api: str, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = _flow_run(api, flow_run_id)
        if run["state"]["type"] in TERMINAL or time.monotonic() > deadline:
            return run
        time.sleep(3)


def _worker_log(stack: dict, pool: str, lines: int = 40) -> str:
    log = Path(stack["root"]) / f"worker-{pool}.log"
    tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no worker log)"]
    return f"\n--- last lines of {log} ---\n" + "\n".join(tail)


# --- the journey ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(1800)
def test_a_user_trains_from_the_prefect_ui_and_finds_the_promoted_model_in_mlflow(
    chromium, production_stack, fixture_csv, tiny_model_dir, journey
):
    from playwright.sync_api import expect

    api, tracking = production_stack["prefect"], production_stack["mlflow"]
    prefect_ui = api.removesuffix("/api")
    page = journey.page

    # 1. Prefect UI: Deployments -> training (of flow training) -> Run -> Custom run.
    page.goto(prefect_ui)
    page.get_by_role("link", name="Deployments", exact=True).click()
    expect(page.get_by_text(f"{len(production_stack['deployments'])} Deployments")).to_be_visible()
    # Three rows show a link "training" (the flow of training, training-cpu and retraining); the deployment
    # `training` is the row whose other link is not another deployment's name.
    training_row = (
        page.get_by_role("row")
        .filter(has=page.get_by_role("link", name="training", exact=True))
        .filter(has_not=page.get_by_role("link", name=re.compile(r"^(retraining|training-cpu)$")))
    )
    expect(training_row).to_have_count(1)
    journey.shot("prefect-deployments")
    training_row.get_by_role("link", name="training", exact=True).first.click()  # the deployment's name comes first
    expect(page).to_have_url(re.compile(r"/deployments/deployment/" + UUID))
    training = _deployment(api, "training", "training")
    assert training["id"] in page.url, "clicked a deployment other than training/training"
    expect(page.get_by_text("gpu", exact=True).first).to_be_visible()  # its work pool
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()

    # The custom-run form: the deployment's typed parameters (nested pydantic models) as form fields.
    expect(page).to_have_url(re.compile(r"/run(\?|$)"))
    source = page.get_by_label("Source (Optional)")
    expect(source).to_have_value("bbc-news")  # the deployment's default, before editing
    fast = {
        "Source (Optional)": str(fixture_csv),
        "Base Model (Optional)": str(tiny_model_dir),
        "Max Length (Optional)": "32",
        "Epochs (Optional)": "8",
        "Batch Size (Optional)": "8",
        "Learning Rate (Optional)": "0.002",
        "Early Stopping Patience (Optional)": "0",
    }
    for label, value in fast.items():
        page.get_by_label(label, exact=True).fill(value)
    name_field = page.get_by_label("registered_model_name (Optional)", exact=True)
    name_field.clear()
    name_field.press_sequentially(MODEL_NAME, delay=20)  # typed key by key, as a user does
    for label, value in {**fast, "registered_model_name (Optional)": MODEL_NAME}.items():
        expect(page.get_by_label(label, exact=True)).to_have_value(value)
    run_name = page.get_by_label("Run Name").input_value()
    assert run_name, "the custom-run form proposes no run name"
    journey.shot("prefect-custom-run-form")
    page.get_by_role("button", name="Submit").click()

    # The toast names the new run; "View run" opens it.
    expect(page.get_by_text(f"{run_name} scheduled to start now")).to_be_visible()
    journey.shot("prefect-run-submitted")
    page.get_by_role("link", name="View run").or_(page.get_by_role("button", name="View run")).first.click()
    expect(page).to_have_url(re.compile(r"/runs/flow-run/" + UUID))
    flow_run_id = re.search(r"/runs/flow-run/(" + UUID + ")", page.url).group(1)
    expect(page.get_by_text(run_name, exact=True).first).to_be_visible()

    # 2. Follow the run in the UI until its page shows "Completed" (the gpu pool's worker runs it on the CPU here).
    # The API decides when the run is done ("Completed" alone may match other text on the page); the run's own
    # page must then show it.
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    shot_running = False
    while (state := _flow_run(api, flow_run_id)["state"])["type"] != "COMPLETED":
        if state["type"] == "RUNNING" and not shot_running:
            journey.shot("prefect-flow-run-running")
            shot_running = True
        if state["type"] in TERMINAL - {"COMPLETED"}:
            journey.shot("prefect-flow-run-not-completed")
            pytest.fail(
                f"training flow run {run_name} ended {state['type']}: {state.get('message')}"
                + _worker_log(production_stack, "gpu")
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"the flow run {run_name} did not complete within {TRAINING_TIMEOUT_S} s "
                f"(API state {state['type']})" + _worker_log(production_stack, "gpu")
            )
        time.sleep(3)
    # MLflow (on PostgreSQL) has the run and a new @candidate, registered by exactly this flow run.
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    assert resolve_alias(tracking, MODEL_NAME, CANDIDATE_ALIAS) == 1
    candidate = client.get_model_version(MODEL_NAME, "1")
    assert candidate.tags["prefect.flow_run_id"] == flow_run_id
    assert client.get_run(candidate.run_id).data.metrics["test_macro_f1"] > 0.5
    page.reload()
    expect(page.get_by_text(run_name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=30_000)
    journey.shot("prefect-flow-run-completed")
    page.get_by_role("tab", name="Parameters").click()
    # The editor renders only the lines in view (the form has every model and dataset field): check those at the
    # top here; the REST API below checks registered_model_name, further down.
    expect(page.get_by_text('"max_length": 32').first).to_be_visible()
    expect(page.get_by_text(str(fixture_csv)).first).to_be_visible()
    journey.shot("prefect-flow-run-parameters")

    # The REST API agrees: the run completed on the gpu pool with exactly what was typed.
    finished = _flow_run(api, flow_run_id)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert finished["deployment_id"] == training["id"] and finished["name"] == run_name
    assert finished["work_pool_name"] == "gpu"
    parameters = finished["parameters"]
    assert parameters["registered_model_name"] == MODEL_NAME
    assert parameters["dataset"]["source"] == str(fixture_csv)
    assert {k: parameters["model"][k] for k in ("base_model", "max_length")} == {
        "base_model": str(tiny_model_dir),
        "max_length": 32,
    }
    assert {
        k: parameters["training"][k] for k in ("epochs", "batch_size", "learning_rate", "early_stopping_patience")
    } == {"epochs": 8, "batch_size": 8, "learning_rate": 0.002, "early_stopping_patience": 0}

    # 3. Its completion triggers the promotion deployment (prefect.yaml's automation), on this run's version.
    promotion = _deployment(api, "promotion", "promotion")
    deadline = time.monotonic() + 180
    promotion_runs: list[dict] = []
    while not promotion_runs and time.monotonic() < deadline:
        runs = (
            httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [promotion["id"]]}}})
            .raise_for_status()
            .json()
        )
        promotion_runs = [r for r in runs if r["parameters"].get("training_flow_run_id") == flow_run_id]
        if not promotion_runs:
            time.sleep(3)
    assert len(promotion_runs) == 1, f"the completion of {run_name} did not trigger the promotion deployment"
    assert promotion_runs[0]["parameters"] == {"registered_model_name": MODEL_NAME, "training_flow_run_id": flow_run_id}
    promoted = _wait_for(api, promotion_runs[0]["id"], PROMOTION_TIMEOUT_S)
    assert promoted["state"]["type"] == "COMPLETED", (
        f"promotion run {promoted['name']}: {promoted['state']}" + _worker_log(production_stack, "cpu")
    )
    # In the UI too: Deployments -> promotion -> its run.
    page.get_by_role("link", name="Deployments", exact=True).click()
    promotion_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="promotion", exact=True))
    promotion_row.get_by_role("link", name="promotion", exact=True).first.click()
    expect(page).to_have_url(re.compile(r"/deployments/deployment/" + promotion["id"]))
    page.get_by_role("link", name=promoted["name"], exact=True).first.click()
    expect(page).to_have_url(re.compile(r"/runs/flow-run/" + promoted["id"]))
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    journey.shot("prefect-promotion-completed")

    # 4. MLflow UI: the registered model's version 1 is @champion; its training run has metrics and plots.
    page.add_locator_handler(  # MLflow's one-time "new Model Registry UI" announcement covers the page
        page.get_by_role("button", name="Try it now"), lambda button: button.click()
    )
    page.goto(tracking)
    page.get_by_role("button", name="Model training").click()
    page.get_by_role("link", name="Model registry", exact=True).click()
    page.get_by_role("link", name=MODEL_NAME, exact=True).click()
    version_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="Version 1", exact=True))
    expect(version_row).to_contain_text(re.compile(r"@\s*champion"))  # the alias chip, not a promotion.* tag
    journey.shot("mlflow-registered-model")
    version_row.get_by_role("link", name="Version 1", exact=True).click()
    expect(page).to_have_url(re.compile(rf"#/models/{MODEL_NAME}/versions/1$"))
    expect(page.get_by_text("Aliases").first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^@\s*champion$")).first).to_be_visible()
    expect(page.get_by_text(flow_run_id).first).to_be_visible()  # the prefect.flow_run_id tag
    journey.shot("mlflow-model-version")

    version = client.get_model_version(MODEL_NAME, "1")
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    assert resolve_alias(tracking, MODEL_NAME, CHAMPION_ALIAS) == 1
    assert version.tags["promotion.decision"] == "promoted"
    training_run = client.get_run(version.run_id)
    mlflow_run_name = training_run.info.run_name

    page.get_by_role("link", name="Experiments", exact=True).click()
    page.get_by_role("link", name="text-classifier", exact=True).click()
    page.get_by_role("link", name=mlflow_run_name, exact=True).click()
    expect(page).to_have_url(re.compile(rf"/runs/{version.run_id}"))
    metric_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="test_macro_f1", exact=True))
    expect(metric_row).to_be_visible()
    shown = float(re.search(r"\d+(\.\d+)?(e-?\d+)?", metric_row.inner_text().replace("test_macro_f1", "")).group(0))
    assert math.isclose(shown, training_run.data.metrics["test_macro_f1"], rel_tol=1e-6), shown
    expect(page.get_by_role("link", name="test_accuracy", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name=MODEL_NAME, exact=True)).to_be_visible()  # "Registered models: ui-topics v1"
    metric_row.scroll_into_view_if_needed()  # the page scrolls inside MLflow's frame: bring the metrics into the shot
    journey.shot("mlflow-training-run-metrics")

    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("evaluation", exact=True).first.click()
    for plot in ("confusion_matrix.png", "per_class_f1.png", "reliability_diagram.png"):
        expect(page.get_by_text(plot, exact=True)).to_be_visible()
    page.get_by_text("confusion_matrix.png", exact=True).click()
    expect(page.get_by_text("evaluation/confusion_matrix.png", exact=True)).to_be_visible()
    preview = page.get_by_role("img", name="evaluation/confusion_matrix.png", exact=True)
    expect(preview).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=preview.element_handle())  # drawn
    journey.shot("mlflow-training-run-confusion-matrix")
    journey.finish()
