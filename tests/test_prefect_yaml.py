"""prefect.yaml: every deployment points at a real flow, and its parameters pass that flow's validation."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_and_parameters_are_valid():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"], "prefect.yaml declares no deployment"
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        validated = flow.validate_parameters(deployment.get("parameters", {}))
        assert validated, deployment["name"]


def test_trigger_parameters_validate_against_the_triggered_flow():
    """The automation passes rendered templates (strings): they must fit the promotion flow's parameters."""
    from flows.promotion import promotion

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployment = next(d for d in config["deployments"] if d["name"] == "promotion")
    (trigger,) = deployment["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["match_related"] == {"prefect.resource.role": "flow", "prefect.resource.name": ["training", "sweep"]}
    rendered = {key: "rendered-value" for key in trigger["parameters"]}
    assert promotion.validate_parameters({**deployment.get("parameters", {}), **rendered})


def test_deployments_share_pools_and_schedules_through_definitions():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {d["name"]: d["work_pool"]["name"] for d in config["deployments"]}
    assert pools == {
        "training": "gpu",
        "training-cpu": "cpu",
        "retraining": "gpu",
        "sweep": "gpu",
        "promotion": "cpu",
        "rollback": "cpu",
        "batch-scoring": "cpu",
        "monitoring": "cpu",
    }
    retraining = next(d for d in config["deployments"] if d["name"] == "retraining")
    assert retraining["schedules"] == [config["definitions"]["schedules"]["weekly"]]
    assert retraining["schedules"][0]["cron"] == "0 3 * * 1"
    text = (ROOT / "prefect.yaml").read_text()
    assert "*gpu_pool" in text and "*cpu_pool" in text and "*weekly_retraining" in text  # YAML anchors, not copies


def test_deploy_refuses_an_unknown_pool_type():
    import pytest

    from flows.deploy import DeployError, deploy

    with pytest.raises(DeployError, match="Unknown work-pool type 'ecs': use one of process, docker, kubernetes"):
        deploy("http://127.0.0.1:9/api", "ecs")


def test_flow_parameters_reject_out_of_bounds_values_with_the_field_named():
    import pytest
    from prefect.exceptions import ParameterTypeError

    from flows.training import training

    with pytest.raises(ParameterTypeError, match="epochs"):
        training.validate_parameters({"training": {"epochs": 0}})
    with pytest.raises(ParameterTypeError, match="max_length"):
        training.validate_parameters({"model": {"max_length": 100000}})


def test_flow_parameter_schema_has_descriptions_for_the_ui_form():
    from prefect.utilities.callables import parameter_schema

    from flows.training import training

    schema = parameter_schema(training).model_dump_for_openapi()
    definitions = schema["definitions"]
    assert set(schema["properties"]) == {"dataset", "model", "training", "evaluation", "registered_model_name"}
    assert definitions["TrainingParameters"]["properties"]["epochs"]["minimum"] == 1
    coverage = definitions["EvaluationParameters"]["properties"]["target_coverage"]
    assert (coverage["default"], coverage["exclusiveMinimum"], coverage["maximum"]) == (0.95, 0, 1)
    for model in ("DatasetParameters", "ModelParameters", "TrainingParameters", "EvaluationParameters"):
        for name, field in definitions[model]["properties"].items():
            assert field.get("description"), f"{model}.{name} has no description in the UI form"


def test_deployments_set_only_what_differs_from_the_flow_defaults():
    """Defaults live in the flows' parameter models: a deployment repeating one would silently pin it."""
    import inspect
    import typing

    from pydantic import BaseModel

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        signature = inspect.signature(flow.fn)
        for parameter, value in deployment.get("parameters", {}).items():
            default = signature.parameters[parameter].default
            if isinstance(default, BaseModel):
                for field, field_value in value.items():
                    assert field_value != getattr(default, field), f"{deployment['name']}: {parameter}.{field}"
            elif isinstance(value, dict):  # a required model parameter: compare with its model's field defaults
                model = typing.get_type_hints(flow.fn)[parameter]
                for field, field_value in value.items():
                    info = model.model_fields[field]
                    assert info.is_required() or field_value != info.default, (
                        f"{deployment['name']}: {parameter}.{field}"
                    )
            else:
                assert value != default, f"{deployment['name']}: {parameter} repeats the flow's default {default!r}"
