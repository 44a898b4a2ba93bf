"""The BentoML service that serves the champion text classifier.

One model, loaded once at start-up from the Bento's own model store (never from MLflow), and one batchable
API, `classify`: BentoML's adaptive batching merges concurrent requests into one forward pass, and each batch
is tokenized once. The promotion flow imports the champion into the model store and builds the Bento from
`bentofile.yaml` with the Bento argument `model_tag` (`bentoml build --arg model_tag=text-classifier:<version>`),
which the built Bento keeps; `TEXTCLF_BENTO_MODEL` names the model when serving from the repository instead."""

from __future__ import annotations

import logging
from typing import Annotated, Any, cast

import bentoml
from bentoml.validators import ContentType
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from tasks.serving.abstention import UNKNOWN_LABEL, answer_label, check_label_names
from tasks.serving.asgi import ASGIApp, Receive, Scope, Send
from tasks.serving.http_guard import (
    MAX_REQUEST_CHARS,
    MAX_TEXT_CHARS,
    MAX_TEXTS_PER_REQUEST,
    BearerTokenAuth,
    RequestGuard,
    ServingLimits,
    bound_metric_labels,
    forget_stale_batch_wait,
    one_line_client_errors,
)
from tasks.serving.request_log import RequestLogMiddleware, RequestLogSettings
from tasks.serving.settings import ServingSettings
from tasks.serving.windows import has_visible_character

# The documented request limits (README, OpenAPI) are tasks/serving/http_guard.py's MAX_TEXTS_PER_REQUEST,
# MAX_TEXT_CHARS and MAX_REQUEST_CHARS: bad input gets a 400 that names the limit, never a 500.
# Adaptive batching: the defaults of tasks/serving/settings.py (where the measurement that chose them is described),
# repeated as plain numbers for bench/serving_load.py, which reads them from this source (tests/test_settings.py
# checks they agree).
MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 30000
CLASSIFY_PATH = "/classify"  # the route of the `classify` API; the middlewares below and tracing name it too

# Every environment variable the service reads, read once, here, at import (so at the server's start-up): a bad value
# stops the start-up with a message naming the variable, the value and the default (tasks/serving/settings.py,
# README "Configuration"). What each does:
# - TEXTCLF_ADAPTIVE_BATCHING=false serves `classify` unbatched (each request is its own forward pass, one at a
#   time); TEXTCLF_MAX_BATCH_SIZE (>= 2, BentoML's minimum) and TEXTCLF_MAX_LATENCY_MS (>= 1) override the
#   defaults above (for benchmarks, bench/serving_load.py).
# - The request log (tasks/serving/request_log.py): one row per served text, written off the request path as Parquet
#   files; TEXTCLF_REQUEST_LOG=false switches it off, TEXTCLF_REQUEST_LOG_DIR, _TEXT, _FLUSH_SECONDS, _MAX_RECORDS.
# - Tracing. BentoML wraps every request in OpenTelemetry spans even when no exporter is configured (its default):
#   spans nobody receives, which cost `classify` 15-20 % of the server's requests/s (bench/serving_load.py). So
#   `classify` is left out of BentoML's tracing (its `tracing.excluded_urls`) unless TEXTCLF_TRACING=true, and
#   RequestIdMiddleware gives each request what the span gave it: the X-BentoML-Request-ID header (which the request
#   log records) and trace and span ids in the server's log lines. Set TEXTCLF_TRACING=true together with BentoML's
#   tracing configuration (an exporter) to have BentoML trace `classify`.
# - Body size, admission and queueing (tasks/serving/http_guard.py ServingLimits): TEXTCLF_MAX_BODY_BYTES,
#   TEXTCLF_MAX_IN_FLIGHT, TEXTCLF_MAX_QUEUED, TEXTCLF_QUEUE_TIMEOUT_SECONDS.
# - TEXTCLF_FORGET_BATCH_WAIT=false keeps BentoML's dispatcher as it is (for bench/overload.py's comparison).
# - Abstaining (tasks/serving/abstention.py): TEXTCLF_MIN_CONFIDENCE (0 to 1; unset = never abstain) answers `label`
#   "unknown" for texts whose top-class probability is below it (probabilities still given). The training run
#   suggests a value (MLflow metric `suggested_min_confidence`, README "Abstaining").
# - TEXTCLF_API_TOKEN: the bearer token every path but health, metrics and the docs needs (unset: none).
# - TEXTCLF_BENTO_MODEL: the model served from the repository (a built Bento keeps its own, `model_tag`).
SETTINGS = ServingSettings.load()
ADAPTIVE_BATCHING = SETTINGS.adaptive_batching
BATCH_SIZE = SETTINGS.max_batch_size
BATCH_LATENCY_MS = SETTINGS.max_latency_ms
REQUEST_LOG = RequestLogSettings.from_settings(SETTINGS)
TRACE_CLASSIFY = SETTINGS.tracing
LIMITS = ServingLimits.from_settings(SETTINGS)
FORGET_BATCH_WAIT = SETTINGS.forget_batch_wait
MIN_CONFIDENCE = SETTINGS.min_confidence


def _not_blank(text: str) -> str:
    if not has_visible_character(text):
        raise ValueError(
            "text is empty or whitespace-only (it has no visible character: only spaces, control or "
            "zero-width characters): send the text to classify"
        )
    return text


def _within_budget(texts: list[str]) -> list[str]:
    total = sum(len(text) for text in texts)
    if total > MAX_REQUEST_CHARS:
        raise ValueError(
            f"the texts hold {total} characters in all, more than the {MAX_REQUEST_CHARS} a request may "
            f"hold: send them in several requests"
        )
    return texts


Text = Annotated[
    str,
    StringConstraints(max_length=MAX_TEXT_CHARS),
    AfterValidator(_not_blank),
    Field(
        description=f"A text to classify: at least one visible character (not only whitespace, control or "
        f"zero-width characters), at most {MAX_TEXT_CHARS} characters."
    ),
]


class Prediction(BaseModel):
    label: str = Field(
        description=f"The predicted class, or '{UNKNOWN_LABEL}' when the server abstains: its "
        f"TEXTCLF_MIN_CONFIDENCE is set and `probability` is below it (unset: never '{UNKNOWN_LABEL}'). A multi-label "
        "model: its most probable class (its answer is `labels`)."
    )
    labels: list[str] = Field(
        description="The classes the text is answered with, most probable first. A multi-label model: every class "
        "whose probability reaches its threshold (chosen per class on the validation split), maybe none. A "
        f"single-label model: `label` alone (none when it is '{UNKNOWN_LABEL}')."
    )
    probability: float = Field(
        description=f"Probability of the most probable class (also when `label` is '{UNKNOWN_LABEL}')."
    )
    probabilities: dict[str, float] = Field(
        description=f"Probability of every class (also when `label` is '{UNKNOWN_LABEL}'): a softmax over the classes, "
        "or for a multi-label model each class's own sigmoid probability (they need not sum to 1)."
    )
    truncated: bool = Field(
        description="True when the text did not fit in one window of the model's max length: it "
        "was cut, or (truncation 'chunks') read in several windows whose logits were averaged."
    )
    model_version: str = Field(description="Registered model name and version that answered.")


class RequestIdMiddleware:
    """ASGI middleware for paths left out of tracing: each request gets a fresh id, as BentoML's server span would
    give it (the X-BentoML-Request-ID header and the request id of log records), and a non-recording span with
    random trace and span ids is current while it runs, so log lines carry `(trace=..,span=..,sampled=0)` as usual."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...]):
        # BentoML 1.4 keeps the request id and its final configuration (read here, in the server) in these.
        from bentoml._internal.configuration.containers import BentoMLContainer
        from bentoml._internal.context import trace_context
        from opentelemetry import trace
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self.app, self.paths = app, frozenset(paths)
        self.trace, self.trace_context, self.ids = trace, trace_context, RandomIdGenerator()
        exporter = BentoMLContainer.config.tracing.exporter_type.get()
        if exporter:
            logging.getLogger("bentoml.serve").warning(
                "BentoML tracing exports spans (tracing.exporter_type=%s), but %s is left out of tracing: set "
                "TEXTCLF_TRACING=true to trace it.",
                exporter,
                ", ".join(sorted(self.paths)),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        span_id = self.ids.generate_span_id()
        span = self.trace.NonRecordingSpan(
            self.trace.SpanContext(self.ids.generate_trace_id(), span_id, is_remote=False)
        )
        self.trace_context.request_id = span_id
        try:
            with self.trace.use_span(span):
                await self.app(scope, receive, send)
        finally:
            self.trace_context.request_id = None


# What answers, as a Prometheus series (value 1): the Grafana dashboard shows the runtime variant from it.
MODEL_INFO = bentoml.metrics.Gauge(
    name="textclf_model_info",
    documentation="The model this server answers with.",
    labelnames=["registered_model", "model_version", "runtime"],
)


@bentoml.service(
    name="text-classifier",
    workers=1,
    traffic={"timeout": 60},
    **({} if TRACE_CLASSIFY else {"tracing": {"excluded_urls": [f"{CLASSIFY_PATH}$"]}}),  # a regex on the URL
)
class TextClassifierService:
    # The model is fixed when the Bento is built (a Bento argument stored in the Bento), never "whatever is latest".
    model_ref = bentoml.models.BentoModel(bentoml.use_arguments().__dict__.get("model_tag") or SETTINGS.bento_model)

    def __init__(self) -> None:
        from tasks.serving.classifier import TextClassifier  # heavy imports (torch, transformers) only in the worker

        self.classifier = TextClassifier(self.model_ref.path)
        check_label_names(self.classifier.label_names, MIN_CONFIDENCE)
        labels = self.model_ref.info.labels
        self.model_version = (
            f"{labels.get('registered_model', 'model')}/{labels.get('model_version', '?')}+{self.classifier.runtime}"
        )
        MODEL_INFO.labels(
            registered_model=labels.get("registered_model", "model"),
            model_version=labels.get("model_version", "?"),
            runtime=getattr(self.classifier, "runtime", "pytorch"),
        ).set(1)

    @bentoml.api(  # type: ignore[untyped-decorator]  # BentoML's SDK (_bentoml_sdk) ships no type information
        route=CLASSIFY_PATH, batchable=ADAPTIVE_BATCHING, max_batch_size=BATCH_SIZE, max_latency_ms=BATCH_LATENCY_MS
    )
    def classify(
        self,
        texts: Annotated[
            list[Text],
            AfterValidator(_within_budget),
            Field(
                min_length=1,
                max_length=MAX_TEXTS_PER_REQUEST,
                description=f"1 to {MAX_TEXTS_PER_REQUEST} texts to classify, at most {MAX_REQUEST_CHARS} "
                f"characters in all.",
            ),
        ],
    ) -> Annotated[list[Prediction], ContentType("application/json")]:
        # The declared content type spares BentoML from building the answer's JSON schema for every response just
        # to find its media type (a fifth of the server's CPU time under load; +14 % requests/s, bench/serving_load.py).
        probabilities, truncated = self.classifier.classify(texts)
        names = self.classifier.label_names
        multi_label = self.classifier.multi_label
        answers = []
        for row, classes, cut in zip(probabilities, self.classifier.label_sets(probabilities), truncated):
            top = names[int(row.argmax())]
            label = top if multi_label else answer_label(top, float(row.max()), MIN_CONFIDENCE)
            answers.append(
                Prediction(
                    label=label,
                    labels=classes if multi_label or label != UNKNOWN_LABEL else [],
                    probability=float(row.max()),
                    probabilities={name: float(p) for name, p in zip(names, row)},
                    truncated=cut,
                    model_version=self.model_version,
                )
            )
        return answers


# In the server process: unknown paths share one metric label, lone requests after a load are not corked, and client
# errors are logged as one line (tasks/serving/http_guard.py says why each is needed with BentoML 1.4).
bound_metric_labels()
if FORGET_BATCH_WAIT:
    forget_stale_batch_wait()
one_line_client_errors()
# Middlewares, outermost first. `@bentoml.service` made the class a bentoml Service, which mypy cannot see (it does not
# apply class decorators), and BentoML's SDK has no type information: its methods are reached through `Any`.
SERVICE = cast(Any, TextClassifierService)
if not TRACE_CLASSIFY:  # added first: it wraps the other middlewares, so they all run with the request id set
    SERVICE.add_asgi_middleware(RequestIdMiddleware, paths=(CLASSIFY_PATH,))
if SETTINGS.api_token:  # before admission: a request without the token never takes a slot
    SERVICE.add_asgi_middleware(BearerTokenAuth, token=SETTINGS.api_token.get_secret_value())
SERVICE.add_asgi_middleware(RequestGuard, limits=LIMITS, api_paths=(CLASSIFY_PATH,))
# Added after the auth middleware, so it runs inside it: it logs `classify` requests answered 200, with their whole
# server-side latency (body, validation, waiting for the adaptive batch, forward pass, answer).
if REQUEST_LOG.enabled:
    SERVICE.add_asgi_middleware(RequestLogMiddleware, settings=REQUEST_LOG, paths=(CLASSIFY_PATH,))
