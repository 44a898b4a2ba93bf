"""The serving runtime's one settings source: `ServingSettings`, every environment variable the Bento service reads
(`TEXTCLF_<FIELD>`), typed, bounded and documented (README "Configuration", checked by tests/test_settings.py).
service.py reads it once, at import (so at the server's start-up); the modules it configures take the values as
parameters. The request log's and the admission's variables are groups of their own (`RequestLogEnv`,
`AdmissionEnv`), so a part that needs only them (the drift flow finds the request log with `RequestLogEnv`) is not
stopped by a bad value of another group.

Today's rules, kept for every variable: unset or blank (only whitespace) means the default; booleans are one of
true/1/yes/on or false/0/no/off in any case (TEXTCLF_ADAPTIVE_BATCHING: anything but "false" keeps batching on);
numbers are finite and within their bounds. A bad value raises a ValueError naming the variable, the value and the
default (`load`), so a server stops at once with a message that says how to fix it.

Standard library and pydantic-settings only (it ships in the Bento, bentofile.yaml `include`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Self

import annotated_types
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TEXTCLF_"
TRUE_WORDS, FALSE_WORDS = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})

# Adaptive batching, chosen by measurement (bench/overload.py, wrk, one news article per request, 64 connections):
# batches of up to 32 texts served 157 requests/s with ONNX int8 (p99 633 ms) against 113 (p99 1,021 ms) at 64, and
# 46.8 against 40.5 with PyTorch: smaller batches pad less and wait less. Overload is handled in front of BentoML's
# dispatcher (tasks/serving/http_guard.py: at most 64 requests inside, a bounded queue, 503 with Retry-After), so the
# dispatcher's own shedding (a 503 when a request's estimated latency exceeds max_latency_ms, which refused 92 % of
# 256 clients at 1,000 ms) is set out of the way. service.py repeats both as MAX_BATCH_SIZE and MAX_LATENCY_MS
# (bench/serving_load.py reads them from its source; tests/test_settings.py checks they agree).
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_LATENCY_MS = 30_000
DEFAULT_FLUSH_SECONDS = 5.0
DEFAULT_MAX_RECORDS = 10_000

# The variables of the mapping `load` was given (None: the process environment, read by pydantic-settings).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("textclf_serving_environ", default=None)


def variable(field_name: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field_name.upper()}"


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, int | float):
        return f"{default:g}"
    return str(default)


def parse_bool(name: str, raw: str, default: bool) -> bool:
    """One of TRUE_WORDS or FALSE_WORDS (any case, surrounding whitespace ignored); else a ValueError naming `name`."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={raw.strip()!r} is not true or false (unset it to use the default, {_shown(default)})")


def parse_number(
    name: str, raw: str, default: float | None, kind: type[int] | type[float], minimum: float, maximum: float | None
) -> int | float:
    """`kind` (int or float) from `raw`, finite, at least `minimum` and at most `maximum` (if given); else a
    ValueError naming `name`, the value and the default."""
    raw = raw.strip()
    try:
        value: int | float = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not {what} (unset it to use the default, {_shown(default)})") from None
    if not value >= minimum or math.isnan(value) or math.isinf(value) or (maximum is not None and value > maximum):
        bounds = f"at least {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
        raise ValueError(
            f"{name}={raw} must be a finite number, {bounds} (unset it to use the default, {_shown(default)})"
        )
    return value


def _bounds(field: FieldInfo) -> tuple[float, float | None]:
    """The field's ge/le constraints (the bounds the README documents and the JSON schema shows)."""
    minimum: float = 0
    maximum: float | None = None
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Ge):
            minimum = float(constraint.ge)  # type: ignore[arg-type]  # annotated_types types ge as a protocol
        elif isinstance(constraint, annotated_types.Le):
            maximum = float(constraint.le)  # type: ignore[arg-type]  # annotated_types types le as a protocol
    return minimum, maximum


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of the process environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ  # before super().__init__, which loads the variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        items = self._environ.items()
        return {k: v for k, v in items} if self.case_sensitive else {k.lower(): v for k, v in items}


class EnvGroup(BaseSettings):
    """Shared rules of the serving settings (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)
    # Fields whose value is taken as it is (not stripped; only the empty string means unset).
    verbatim: ClassVar[frozenset[str]] = frozenset({"api_token"})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        return (init_settings, env_settings if environ is None else _MappingSource(settings_cls, environ))

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The settings from the process environment (or from `environ`, for tests and tools). A bad value raises a
        ValueError naming the variable, the value and how to fix it (one line per bad variable)."""
        with _reading(environ):
            try:
                return cls()
            except ValidationError as error:
                raise ValueError(_explain(error)) from None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {
            k: v
            for k, v in values.items()
            if not (isinstance(v, str) and (v == "" if k in cls.verbatim else not v.strip()))
        }

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, value: Any, info: ValidationInfo) -> Any:
        """Today's parsing and messages for booleans and numbers; other strings stripped."""
        name = info.field_name
        if name is None or not isinstance(value, str) or name in cls.verbatim:
            return value
        field = cls.model_fields[name]
        kind = _scalar_type(field)
        if kind is bool:
            return parse_bool(variable(name), value, bool(field.default))
        if kind is int or kind is float:
            minimum, maximum = _bounds(field)
            return parse_number(variable(name), value, field.default, kind, minimum, maximum)
        return value.strip()


def _scalar_type(field: FieldInfo) -> object:
    """int, float, bool, str, Path ... of a field annotated `T` or `T | None`."""
    annotation = field.annotation
    arguments = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return arguments[0] if len(arguments) == 1 else annotation


@contextmanager
def _reading(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def _explain(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        name = variable(str(problem["loc"][0])) if problem["loc"] else "a serving setting"
        cause = (problem.get("ctx") or {}).get("error")
        if isinstance(cause, ValueError):  # ours (parse_bool, parse_number): it names the variable already
            lines.append(str(cause))
        else:
            lines.append(f"{name}={problem['input']!r}: {problem['msg']} (unset it to use the default)")
    return "; ".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The groups and the whole
# ----------------------------------------------------------------------------------------------------------


class RequestLogEnv(EnvGroup):
    """The request log (tasks/serving/request_log.py `RequestLogSettings`)."""

    home: Path = Field(
        default=Path(".textclf"),
        description="Project data folder; the request log's default folder is `<home>/request-log`.",
    )
    request_log: bool = Field(
        default=True, description="Write one row per served text as Parquet files (`false` switches it off)."
    )
    request_log_dir: Path | None = Field(
        default=None,
        description="Folder of the request log; unset means `<TEXTCLF_HOME>/request-log`. A relative path is "
        "resolved against the server's working directory (a built Bento's own folder: give an absolute path).",
    )
    request_log_text: bool = Field(default=False, description="Keep the raw texts too (by default only hashes).")
    request_log_flush_seconds: float = Field(
        default=DEFAULT_FLUSH_SECONDS,
        ge=0.01,
        description="Longest a served row waits before it is written to a Parquet file (seconds).",
    )
    request_log_max_records: int = Field(
        default=DEFAULT_MAX_RECORDS, ge=1, description="Most rows in one Parquet file of the request log."
    )

    @property
    def request_log_directory(self) -> Path:
        """TEXTCLF_REQUEST_LOG_DIR, else `<TEXTCLF_HOME>/request-log`, `~` expanded (relative stays relative)."""
        if self.request_log_dir is not None:
            return self.request_log_dir.expanduser()
        return self.home.expanduser() / "request-log"


class AdmissionEnv(EnvGroup):
    """Body size, admission and queueing (tasks/serving/http_guard.py `ServingLimits`); defaults chosen by
    measurement (bench/serving_load.py, README "Serving")."""

    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,  # 64 texts x 20,000 characters, even as \\uXXXX escapes, fit
        ge=1024,
        description="Largest request body in bytes (413 above it).",
    )
    max_in_flight: int = Field(
        default=64, ge=1, description="Requests inside the server at once (about one adaptive batch)."
    )
    max_queued: int = Field(
        default=512, ge=0, description="Requests waiting for admission; beyond it a request gets 503 at once."
    )
    queue_timeout_seconds: float = Field(
        default=2.0, ge=0, description="Longest a request waits for admission before its 503 (seconds)."
    )


class ServingSettings(RequestLogEnv, AdmissionEnv):
    """Every environment variable the Bento service reads: `TEXTCLF_<FIELD>` (README "Configuration")."""

    bento_model: str = Field(
        default="text-classifier:latest",
        description="Model store tag served when running service.py from the repository (a built Bento keeps "
        "its own model, the Bento argument `model_tag`).",
    )
    adaptive_batching: bool = Field(
        default=True,
        description="Adaptive batching of `classify`; anything but `false` keeps it on (`false`: each request "
        "is its own forward pass, for benchmarks).",
    )
    max_batch_size: int = Field(
        default=DEFAULT_MAX_BATCH_SIZE, ge=2, description="Largest adaptive batch (texts); BentoML's minimum is 2."
    )
    max_latency_ms: int = Field(
        default=DEFAULT_MAX_LATENCY_MS,
        ge=1,
        description="BentoML's dispatcher latency budget (ms); set high, overload is handled by the admission.",
    )
    api_token: SecretStr | None = Field(
        default=None, description="When set, every path but health, metrics and the docs needs this bearer token."
    )
    tracing: bool = Field(
        default=False,
        description="`true`: BentoML's tracing covers `/classify` too (with a tracing exporter configured).",
    )
    forget_batch_wait: bool = Field(
        default=True,
        description="Forget the dispatcher's learned batch wait after a batch of one (`false`: BentoML as it is).",
    )
    min_confidence: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Answer `unknown` below this top-class probability; unset means never abstain.",
    )

    @model_validator(mode="before")
    @classmethod
    def _adaptive_batching_unless_false(cls, values: Any) -> Any:
        """TEXTCLF_ADAPTIVE_BATCHING: anything but "false" (any case) keeps batching on, as it always did."""
        if isinstance(values, dict) and isinstance(values.get("adaptive_batching"), str):
            values = {**values, "adaptive_batching": values["adaptive_batching"].strip().lower() != "false"}
        return values
