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
    assert set(schema["properties"]) == {"dataset", "model", "training", "registered_model_name"}
    assert definitions["TrainingParameters"]["properties"]["epochs"]["minimum"] == 1
    for model in ("DatasetParameters", "ModelParameters", "TrainingParameters"):
        for name, field in definitions[model]["properties"].items():
            assert field.get("description"), f"{model}.{name} has no description in the UI form"
