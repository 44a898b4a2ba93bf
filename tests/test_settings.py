"""One settings source per runtime: flows/settings.py `Settings` (orchestration) and tasks/serving/settings.py
`ServingSettings` (the Bento service), each documented in README "Configuration" (checked here, field by field,
with its default), and no other environment reads in the serving runtime."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from flows.settings import Settings
from tasks.serving.http_guard import ServingLimits
from tasks.serving.request_log import RequestLogSettings
from tasks.serving.settings import AdmissionEnv, RequestLogEnv, ServingSettings, variable

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"Orchestration": Settings, "Serving": ServingSettings}


def readme_tables() -> dict[str, dict[str, str]]:
    """README "Configuration": per runtime subsection (### Orchestration, ### Serving), each variable of its table's
    first column with that row's default cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("### "):
            current = line.removeprefix("### ").split(" ", 1)[0]
            tables[current] = {}
        elif current and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
                tables[current][name] = cells[1]
    return tables


def variables_of(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a field reads: its validation aliases, else TEXTCLF_<NAME>."""
    aliases = getattr(field.validation_alias, "choices", None)
    return [str(a) for a in aliases] if aliases else [variable(name)]


def shown(default: object) -> str | None:
    """How the README writes a default (None: prose, not checked)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float):
        return f"`{default:g}`"
    return f"`{default}`"


def test_the_readme_has_one_table_per_runtime():
    assert set(readme_tables()) == set(TABLES)


@pytest.mark.parametrize("runtime", sorted(TABLES))
def test_every_field_is_in_its_readme_table_with_its_default_and_description(runtime):
    table, settings = readme_tables()[runtime], TABLES[runtime]
    for name, field in settings.model_fields.items():
        names = variables_of(name, field)
        assert any(n in table for n in names), f"README's {runtime} table lacks {names[0]} ({settings.__name__}.{name})"
        assert field.description, f"{settings.__name__}.{name} has no description"
        expected = shown(field.default)
        if expected is not None:
            cell = next(table[n] for n in names if n in table)
            assert cell.startswith(expected), f"README's default of {names[0]} is {cell!r}, the field's is {expected}"


@pytest.mark.parametrize("runtime", sorted(TABLES))
def test_every_textclf_variable_in_a_table_is_a_field(runtime):
    settings = TABLES[runtime]
    known = {n for name, field in settings.model_fields.items() for n in variables_of(name, field)}
    stray = {n for n in readme_tables()[runtime] if n.startswith("TEXTCLF_")} - known
    assert not stray, f"README's {runtime} table lists {sorted(stray)}, which {settings.__name__} does not read"


def test_the_serving_fields_are_bounded_and_the_service_constants_agree():
    for name in ("max_batch_size", "max_latency_ms", "max_body_bytes", "max_in_flight", "max_queued"):
        assert any(hasattr(m, "ge") for m in ServingSettings.model_fields[name].metadata), name
    source = (ROOT / "service.py").read_text()  # bench/serving_load.py reads these two from the source
    for constant, field in (("MAX_BATCH_SIZE", "max_batch_size"), ("MAX_LATENCY_MS", "max_latency_ms")):
        found = re.search(rf"^{constant} = (\d+)$", source, re.M)
        assert found and int(found.group(1)) == ServingSettings.model_fields[field].default


def test_the_serving_runtime_reads_no_environment_but_through_its_settings():
    files = [ROOT / "service.py", *sorted((ROOT / "tasks" / "serving").glob("*.py"))]
    readers = [
        f"{path.name}:{n}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"os\.environ|os\.getenv|getenv\(", line)
    ]
    assert not readers


# ----------------------------------------------------------------------------------------------------------
# ServingSettings: today's parsing, defaults and messages
# ----------------------------------------------------------------------------------------------------------


def test_defaults_and_values_from_a_given_mapping_ignore_the_process_environment(monkeypatch):
    monkeypatch.setenv("TEXTCLF_MAX_QUEUED", "3")
    assert ServingSettings.load().max_queued == 3
    default = ServingSettings.load({})
    assert (default.max_queued, default.adaptive_batching, default.tracing, default.api_token) == (
        512,
        True,
        False,
        None,
    )
    given = ServingSettings.load(
        {
            "TEXTCLF_TRACING": " Yes ",
            "TEXTCLF_MAX_BATCH_SIZE": " 8 ",
            "TEXTCLF_MIN_CONFIDENCE": "   ",  # blank: the default
            "TEXTCLF_API_TOKEN": "s3cret",
            "TEXTCLF_BENTO_MODEL": "topics:7",
        }
    )
    assert (given.tracing, given.max_batch_size, given.min_confidence, given.bento_model) == (True, 8, None, "topics:7")
    assert given.api_token is not None and given.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(given)


@pytest.mark.parametrize(("raw", "expected"), [("false", False), (" FALSE ", False), ("0", True), ("maybe", True)])
def test_adaptive_batching_stays_on_unless_false(raw, expected):
    assert ServingSettings.load({"TEXTCLF_ADAPTIVE_BATCHING": raw}).adaptive_batching is expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"TEXTCLF_TRACING": "maybe"},
            "TEXTCLF_TRACING='maybe' is not true or false (unset it to use the default, false)",
        ),
        ({"TEXTCLF_MAX_BATCH_SIZE": "1"}, "TEXTCLF_MAX_BATCH_SIZE=1 must be a finite number, at least 2 (unset it"),
        ({"TEXTCLF_MAX_IN_FLIGHT": "1.5"}, "TEXTCLF_MAX_IN_FLIGHT='1.5' is not a whole number (unset it to use the "),
        ({"TEXTCLF_MIN_CONFIDENCE": "1.5"}, "TEXTCLF_MIN_CONFIDENCE=1.5 must be a finite number, between 0 and 1"),
        ({"TEXTCLF_QUEUE_TIMEOUT_SECONDS": "inf"}, "TEXTCLF_QUEUE_TIMEOUT_SECONDS=inf must be a finite number"),
        ({"TEXTCLF_REQUEST_LOG_FLUSH_SECONDS": "nan"}, "TEXTCLF_REQUEST_LOG_FLUSH_SECONDS=nan must be a finite"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_the_default(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServingSettings.load(environ)


def test_the_groups_read_only_their_own_variables_and_feed_the_runtime_objects():
    other_bad = {"TEXTCLF_TRACING": "maybe"}
    assert RequestLogSettings.from_env({**other_bad, "TEXTCLF_HOME": "/srv/x"}).directory == Path("/srv/x/request-log")
    assert ServingLimits.from_env({**other_bad, "TEXTCLF_MAX_QUEUED": "0"}).max_queued == 0
    assert set(RequestLogEnv.model_fields) | set(AdmissionEnv.model_fields) <= set(ServingSettings.model_fields)
    whole = ServingSettings.load({"TEXTCLF_REQUEST_LOG_DIR": "/var/log/clf", "TEXTCLF_MAX_IN_FLIGHT": "2"})
    assert RequestLogSettings.from_settings(whole).directory == Path("/var/log/clf")
    assert ServingLimits.from_settings(whole) == ServingLimits(max_in_flight=2)
