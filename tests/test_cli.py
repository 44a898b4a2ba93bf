"""`textclf`: every command's options are generated from its flow's pydantic parameters (description, default and
bounds in the help), out-of-bounds values are a clean usage error (exit 2) naming the option and its bound, the
defaults live in one place, and `textclf score` / `textclf monitor` run end to end on a tiny champion against real
servers and print where to look."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.cli import COMMANDS, build_parser, main
from flows.cli_options import FlowOptions, bounds_text

ROOT = Path(__file__).resolve().parents[1]
FLOW_COMMANDS = [c.name for c in COMMANDS if c.options is not None and c.available()]


def _help(command: str) -> str:
    parser = build_parser([command])
    sub = parser._subparsers._group_actions[0].choices[command]
    return " ".join(sub.format_help().split())  # one line: wrapping must not hide a match


def _options(command: str) -> FlowOptions:
    return build_parser([command]).parse_args([command, *_required(command)]).options


def _required(command: str) -> list[str]:
    return ["--source", "x.csv"] if command == "score" else []


@pytest.mark.parametrize("command", FLOW_COMMANDS)
def test_every_option_shows_its_description_default_and_bounds(command):
    text = _help(command)
    options = _options(command)
    assert options.options, f"textclf {command} has no generated options"
    for option in options.options.values():
        assert option.flag in text
        assert option.info.description, f"{command} {option.flag} has no description"
        # The help line of this option: from its flag to the next option's flag.
        line = text.split(f"{option.flag} ", 1)[1].split("  --", 1)[0]
        assert " ".join(option.info.description.split())[:40] in " ".join(text.split()), option.flag
        if not option.info.is_required():
            shown = (
                {True: "on", False: "off", None: "unset"}.get(option.default, option.default)
                if isinstance(option.default, bool | None)
                else option.default
            )
            if isinstance(shown, list):
                shown = " ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in shown)
            assert f"default: {shown}" in text, f"{command} {option.flag}: no default shown"
        if bounds := bounds_text(option.info):
            assert bounds in text, f"{command} {option.flag}: bounds {bounds!r} not shown"
        assert line


def test_train_help_shows_every_training_parameter_with_its_stage_default():
    text = _help("train")
    for expected in (
        "--seed INT",
        "--class-weighted-loss, --no-class-weighted-loss",
        "--early-stopping-patience INT",
        "--truncation {head,tail,head+tail,chunks}",
        "--head-share FLOAT",
        "--chunk-overlap FLOAT",
        "--max-chunks INT",
        "--chunks-per-training-text INT",
        "--encoding TEXT",
        "--fallback-encoding TEXT",
        "--validation-fraction FLOAT",
        "--test-fraction FLOAT",
        "--split-column TEXT",
        "--hub-config TEXT",
        "--timeout-minutes INT",
        "--weight-decay FLOAT",
        "--device {auto,cuda,cpu}",
        "--precision {auto,fp32,bf16,fp16}",
        "--processes INT",
        "--lora-merge, --no-lora-merge",
        "--registered-model-name TEXT",
        "default: all-MiniLM-L6-v2",
        "(default: 3; 1 <= value <= 100)",
    ):
        assert expected in text, expected
    from tasks.training.fine_tune import FineTuneConfig

    assert f"(default: {FineTuneConfig.model_fields['learning_rate'].default}; 0 < value <= 0.1)" in text


def test_bounds_text():
    from pydantic import Field

    assert bounds_text(Field(ge=1, le=50)) == "1 <= value <= 50"
    assert bounds_text(Field(gt=0, lt=0.5)) == "0 < value < 0.5"
    assert bounds_text(Field(ge=0)) == "value >= 0"
    assert bounds_text(Field(lt=3)) == "value < 3"
    assert bounds_text(Field(min_length=1, max_length=256)) == "1 to 256 characters"
    assert bounds_text(Field()) == ""


def test_the_flow_models_reuse_the_stage_fields_so_each_default_lives_once():
    from flows.training import DatasetParameters, ModelParameters, TrainingParameters
    from tasks.contracts import WindowingConfig
    from tasks.training.fine_tune import FineTuneConfig
    from tasks.training.ingest import IngestConfig
    from tasks.training.preprocess import PreprocessConfig

    assert issubclass(DatasetParameters, IngestConfig) and issubclass(ModelParameters, WindowingConfig)
    pairs = [(TrainingParameters, FineTuneConfig, n) for n in TrainingParameters.model_fields if n != "timeout_minutes"]
    pairs += [(DatasetParameters, PreprocessConfig, n) for n in ("validation_fraction", "test_fraction")]
    assert set(TrainingParameters.model_fields) - {"timeout_minutes"} == set(FineTuneConfig.model_fields) - {
        "base_model"
    }
    for flow_model, stage, name in pairs:
        mine, theirs = flow_model.model_fields[name], stage.model_fields[name]
        assert (mine.annotation, mine.default, mine.description, mine.metadata) == (
            theirs.annotation,
            theirs.default,
            theirs.description,
            theirs.metadata,
        ), name
    # The flow, given nothing, builds the stage configs with exactly their own defaults.
    defaults = TrainingParameters().model_dump(exclude={"timeout_minutes"})
    assert FineTuneConfig(base_model="m", **defaults) == FineTuneConfig(base_model="m")


def test_parsed_options_become_the_flow_parameters_and_only_given_ones_are_set():
    from flows.training import DatasetParameters, ModelParameters, TrainingParameters

    argv = [
        "train",
        "--source",
        "data.csv",
        "--encoding",
        "cp1252",
        "--split-column",
        "",
        "--truncation",
        "head+tail",
        "--head-share",
        "0.5",
        "--class-weighted-loss",
        "--early-stopping-patience",
        "0",
        "--seed",
        "7",
        "--epochs",
        "5",
        "--learning-rate",
        "2e-3",
        "--timeout-minutes",
        "30",
    ]
    args = build_parser(argv).parse_args(argv)
    parameters = args.options.values(args)
    assert parameters == {
        "dataset": DatasetParameters(source="data.csv", encoding="cp1252", split_column=None),
        "model": ModelParameters(truncation="head+tail", head_share=0.5),
        "training": TrainingParameters(
            class_weighted_loss=True,
            early_stopping_patience=0,
            seed=7,
            epochs=5,
            learning_rate=2e-3,
            timeout_minutes=30,
        ),
    }
    args = build_parser(["train"]).parse_args(["train"])
    assert args.options.values(args) == {}  # nothing given: the flow's own defaults apply
    args = build_parser(["monitor"]).parse_args(["monitor", "--alpha", "0.05"])
    parameters = args.options.values(args)
    assert "source" not in parameters and parameters["thresholds"].alpha == 0.05
    args = build_parser(["promote"]).parse_args(["promote", "--first-champion-floor", "0", "--no-containerize"])
    parameters = args.options.values(args)
    assert parameters["gate"].min_macro_f1_first_champion == 0 and parameters["containerize"] is False


def test_the_registered_model_name_defaults_to_the_environment_when_set(monkeypatch):
    from flows.cli import _flow_parameters
    from flows.settings import Settings

    args = build_parser(["score"]).parse_args(["score", "--source", "x.csv"])
    monkeypatch.delenv("TEXTCLF_REGISTERED_MODEL_NAME", raising=False)
    assert "registered_model_name" not in _flow_parameters(args, Settings())
    monkeypatch.setenv("TEXTCLF_REGISTERED_MODEL_NAME", "from-env")
    assert _flow_parameters(args, Settings())["registered_model_name"] == "from-env"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "--max-length", "100000"],
            "--max-length: Input should be less than or equal to 8192 (got '100000')",
        ),
        (["train", "--test-fraction", "0.5"], "--test-fraction: Input should be less than 0.5"),
        (["train", "--epochs", "three"], "--epochs: Input should be a valid integer"),
        (
            ["promote", "--first-champion-floor", "1.5"],
            "--min-macro-f1-first-champion: Input should be less than or equal to 1",
        ),
        (
            ["score", "--source", "x.csv", "--low-confidence-threshold", "1"],
            "--low-confidence-threshold: Input should be less than 1",
        ),
        (["monitor", "--alpha", "0"], "--alpha: Input should be greater than 0"),
        (["monitor", "--text-column", "body"], "--source is needed with --text-column"),
        (["serve", "--port", "70000"], "--port: Input should be less than or equal to 65535"),
    ],
)
def test_a_bad_value_is_a_clean_usage_error_naming_the_option_and_bound(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"textclf {argv[0]}: error: " in err and expected in err, err
    assert "Traceback" not in err and "validation error" not in err


def test_a_bad_value_from_the_installed_command_exits_2_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--epochs", "0", "--truncation", "head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "textclf train: error: --epochs: Input should be greater than or equal to 1 (got '0')" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_every_flow_command_builds_without_clashing_options():
    for command in FLOW_COMMANDS:
        assert _options(command).options


@pytest.fixture(scope="module")
def cli_champion(session_champion):
    return session_champion["name"], session_champion["version"]


@pytest.mark.e2e
def test_textclf_score_end_to_end_prints_where_to_look(
    project_env, servers, cli_champion, fixture_frame, tmp_path, capsys, monkeypatch
):
    name, version = cli_champion
    monkeypatch.setenv("TEXTCLF_REGISTERED_MODEL_NAME", name)  # the default of every command
    source = tmp_path / "new.csv"
    fixture_frame.head(30).assign(doc=[f"d{i}" for i in range(30)]).to_csv(source, index=False)
    assert main(["score", "--source", str(source), "--id-column", "doc", "--chunk-size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"Scored 30 texts from {source} with {name}/{version}" in out
    output = Path(re.search(r"Predictions:\s+(\S+)", out).group(1))
    assert output.parent == project_env.resolve() / "predictions" / name
    table = pq.read_table(output).to_pandas()
    assert table["id"].tolist() == [f"d{i}" for i in range(30)]
    assert (table["label"] == fixture_frame.head(30)["label"].to_numpy()).mean() >= 0.8
    assert re.search(rf"MLflow run:\s+{re.escape(servers['mlflow'])}/#/experiments/\d+/runs/[0-9a-f]{{32}}", out), out
    prefect_ui = servers["prefect"].removesuffix("/api")
    assert re.search(rf"Prefect UI:\s+{re.escape(prefect_ui)}/runs/flow-run/[0-9a-f-]{{36}}", out), out


@pytest.mark.e2e
def test_textclf_monitor_end_to_end_prints_the_decision_and_where_to_look(
    project_env, servers, cli_champion, tmp_path, capsys
):
    from tests.fixtures import make_texts

    name, version = cli_champion
    source = tmp_path / "window.csv"
    make_texts(per_class=10, seed=5)[["text"]].to_csv(source, index=False)
    code = main(
        [
            "monitor",
            "--registered-model-name",
            name,
            "--source",
            str(source),
            "--min-window-size",
            "10",
            "--min-reference-size",
            "10",
            "--permutations",
            "100",
            "--max-embedding-texts",
            "20",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(rf"{name} version {version}: (NO DRIFT|DRIFT)\n", out), out
    assert "Window:       30 texts; reference (the champion's test split): 108 texts" in out
    report = Path(re.search(r"Report:\s+(\S+)", out).group(1))
    assert report.exists() and report.read_text().strip()
    run_id = re.search(r"MLflow run:\s+\S+/runs/([0-9a-f]{32})", out).group(1)
    from mlflow import MlflowClient

    run = MlflowClient(servers["mlflow"]).get_run(run_id)
    assert (
        run.data.tags["textclf.kind"] == "drift-monitoring" and run.data.params["model_version"] == f"{name}/{version}"
    )
    assert f"Prefect UI:   {servers['prefect'].removesuffix('/api')}/runs/flow-run/" in out


@pytest.mark.e2e
def test_textclf_score_without_a_champion_fails_with_the_reason(project_env, servers, tmp_path, capsys):
    source = tmp_path / "new.csv"
    pd.DataFrame({"text": ["a text"]}).to_csv(source, index=False)
    assert main(["score", "--source", str(source), "--registered-model-name", "nobody-promoted"]) == 1
    err = capsys.readouterr().err
    assert "The batch-scoring flow run ended Failed" in err and "has no @champion to score with" in err


def test_deploy_and_serve_options(monkeypatch):
    from flows.cli import DeployOptions

    args = build_parser(["deploy"]).parse_args(["deploy", "--pool-type", "docker", "--project-dir", "/opt/x"])
    assert args.options.values(args) == {"deploy": DeployOptions(pool_type="docker", project_dir="/opt/x")}
    args = build_parser(["serve"]).parse_args(["serve", "--port", "3100"])
    assert args.options.values(args) == {"port": 3100}


@pytest.mark.skipif("sweep" not in FLOW_COMMANDS, reason="flows/sweep.py is not there")
def test_sweep_list_options_take_several_values():
    argv = ["sweep", "--batch-sizes", "8", "16", "--truncations", "head", "chunks", "--n-trials", "3"]
    args = build_parser(argv).parse_args(argv)
    parameters = args.options.values(args)
    assert parameters["search_space"].batch_sizes == [8, 16]
    assert parameters["search_space"].truncations == ["head", "chunks"]
    assert parameters["study"].n_trials == 3
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--batch-sizes", "0"])
    assert exit_.value.code == 2
