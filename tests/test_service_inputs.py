"""The service's input validation, auth, abstaining and documentation, through BentoML's own ASGI app of service.py
(`to_asgi()`, what `bentoml serve` runs) in this process: every bad input answered with a 4xx that says what was
wrong (and the app still serving), wrong media types and encodings, invisible texts, the cost budget, the bearer
token in any case, `min_confidence`, a truthful OpenAPI document. What needs a server process (real sockets, chunked
bodies, Prometheus, logs, overload, a SIGKILL) is in tests/test_service.py and tests/test_service_hardening.py."""

from __future__ import annotations

import json

import pytest

from tasks.serving.abstention import UNKNOWN_LABEL
from tests.fixtures import service_in_process


@pytest.fixture(scope="module")
def client(in_process_bento_model):
    with service_in_process(in_process_bento_model) as client:
        yield client


@pytest.fixture(scope="module")
def client_with_token(in_process_bento_model):
    with service_in_process(in_process_bento_model, TEXTCLF_API_TOKEN="s3cret") as client:
        yield client


def classify(client, texts, **headers):
    return client.post("/classify", json={"texts": texts}, headers=headers)


def post(client, content: bytes, content_type: str | None = "application/json", **headers):
    if content_type:
        headers["content-type"] = content_type
    return client.post("/classify", content=content, headers=headers)


def assert_still_serving(client, **headers) -> None:
    ok = classify(client, ["still here"], **headers)
    assert ok.status_code == 200, ok.text
    assert client.get("/readyz").status_code == 200


# --- bodies the model cannot read -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"texts": ', "Invalid JSON"),
        (b'{"texts": "just one string"}', "valid array"),
        (b'{"texts": [1, 2]}', "valid string"),
        (b'{"text": ["wrong field"]}', "texts"),
        (b'{"texts": []}', "at least 1 item"),
        (b'{"texts": [""]}', "empty or whitespace-only"),
        (b'{"texts": ["   \\n\\t "]}', "empty or whitespace-only"),
        (b'{"texts": ["ok", "' + b"x" * 20_001 + b'"]}', "at most 20000 characters"),
        (b'{"texts": [' + b",".join([b'"text"'] * 65) + b"]}", "at most 64 items"),
        (b'{"texts": ["\xff\xfe invalid utf-8"]}', "Invalid JSON"),
    ],
    ids=[
        "broken-json",
        "string-not-list",
        "numbers",
        "wrong-field",
        "empty-list",
        "empty-text",
        "blank-text",
        "text-too-long",
        "too-many-texts",
        "invalid-utf8",
    ],
)
def test_bad_input_gets_400_with_the_reason_and_the_server_stays_up(client, body, message):
    response = post(client, body)
    assert response.status_code == 400, response.text
    assert message in response.text
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("content_type", "encoding", "message"),
    [
        ("multipart/form-data", None, "'multipart/form-data' without a boundary cannot be read"),  # was a 500
        ("text/plain", None, "'text/plain' is not supported"),
        ("application/xml", None, "send a JSON body with Content-Type: application/json"),
        ("application/json; charset=latin-1", None, "send the body as UTF-8"),
        ("application/json", "gzip", "Content-Encoding 'gzip' is not supported"),
    ],
    ids=["multipart-without-boundary", "text-plain", "xml", "latin-1", "gzip"],
)
def test_unsupported_media_types_and_encodings_get_415(client, content_type, encoding, message):
    headers = {"content-encoding": encoding} if encoding else {}
    response = post(client, b'{"texts": ["a text"]}', content_type, **headers)
    assert response.status_code == 415, response.text
    assert message in response.json()["error"]
    assert_still_serving(client)


def test_json_without_a_content_type_with_utf8_charset_and_forms_are_served(client):
    assert post(client, b'{"texts": ["a text"]}', None).status_code == 200
    assert post(client, b'{"texts": ["a text"]}', "application/json; charset=UTF-8").status_code == 200
    form = client.post("/classify", files={"texts": (None, json.dumps(["a text", "another"]))})
    assert form.status_code == 200 and len(form.json()) == 2  # multipart, with the boundary httpx makes
    assert client.post("/classify", data={"texts": json.dumps(["a text"])}).status_code == 200


# --- texts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["\u0000\u0000\u0000", "\u200b\u200c\u200d\ufeff", "\u00a0\u2028 \t", "\u0000 \u200b \u2060"],
    ids=["nul", "zero-width", "unicode-spaces", "mixed"],
)
def test_texts_without_a_visible_character_get_400(client, text):
    response = classify(client, ["a fine text", text])
    assert response.status_code == 400, response.text
    assert "no visible character" in response.text
    body = response.json()
    assert isinstance(body["detail"], list) and body["detail"][0]["loc"][-1] == 1  # names which text


def test_a_request_over_the_character_budget_gets_400_before_the_model_reads_it(client):
    response = classify(client, ["word " * 4_000] * 64)  # 64 x 20,000
    assert response.status_code == 400, response.text[:300]
    assert "1280000 characters in all, more than the 128000" in response.text
    assert classify(client, ["word " * 4_000] * 6).status_code == 200


# --- auth ----------------------------------------------------------------------------------------------------


def test_bearer_token_auth_when_switched_on(client_with_token):
    client = client_with_token
    assert classify(client, ["no token"]).status_code == 401
    wrong = classify(client, ["wrong token"], Authorization="Bearer nope")
    assert wrong.status_code == 401 and "bearer token" in wrong.text
    assert classify(client, ["right token"], Authorization="Bearer s3cret").status_code == 200
    assert client.get("/readyz").status_code == 200  # probes need no token
    assert client.get("/").status_code == 200 and client.get("/docs.json").status_code == 200


def test_the_bearer_scheme_is_case_insensitive(client_with_token):
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = classify(client_with_token, ["a text"], Authorization=f"{scheme} s3cret")
        assert response.status_code == 200, (scheme, response.text)
    assert classify(client_with_token, ["a text"], Authorization="Basic s3cret").status_code == 401


# --- abstaining ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1.0", "0"])
def test_the_service_abstains_below_its_min_confidence(in_process_bento_model, prepared_fixture, value):
    texts = prepared_fixture[1].split("test")["text"].tolist()
    with service_in_process(in_process_bento_model, TEXTCLF_MIN_CONFIDENCE=value) as client:
        response = classify(client, texts)
    assert response.status_code == 200, response.text
    answers = response.json()
    names = set(prepared_fixture[1].label_names)
    for answer in answers:
        assert set(answer["probabilities"]) == names  # probabilities still given
        assert answer["probability"] == pytest.approx(max(answer["probabilities"].values()))
    labels = {answer["label"] for answer in answers}
    assert labels == {UNKNOWN_LABEL} if value == "1.0" else labels <= names


# --- the document --------------------------------------------------------------------------------------------


def test_the_openapi_document_tells_the_truth(client):
    document = client.get("/docs.json").json()
    assert len(document["info"]["description"]) < 1000  # no README inside
    assert "bearerAuth" in document["components"]["securitySchemes"]
    operation = document["paths"]["/classify"]["post"]
    responses = operation["responses"]
    assert {"200", "400", "401", "413", "415", "503"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"]
    validation = document["components"]["schemas"]["ValidationError"]
    assert validation["properties"]["detail"]["type"] == "array"
    # What a 400 really carries matches what the document says.
    sent = classify(client, []).json()
    assert isinstance(sent["detail"], list) and isinstance(sent["error"], str)
    assert "128000" in json.dumps(document) and "visible character" in json.dumps(document)
