"""Paths under /v1 that nothing serves: a 404 in the OpenAI error shape, which OpenAI SDKs parse,
and never at the cost of the Channels consumers routed before Django or of Ninja's own docs."""

import pytest
from django.test import Client

from tests.fake_upstream import call

NOT_FOUND = {"type": "invalid_request_error", "param": None, "code": "not_found"}


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
@pytest.mark.parametrize("path", ["/v1/nope", "/v1/user/nope", "/v1/models/", "/v1/user/balance/extra", "/v1/"])
def test_an_unknown_v1_path_is_a_json_404_in_the_openai_shape(db, method, path):
    response = getattr(Client(enforce_csrf_checks=True), method)(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json; charset=utf-8"
    error = response.json()["error"]
    assert error == {**NOT_FOUND, "message": f"Unknown URL ({method.upper()} {path})"}
    assert response["X-Request-Id"]


def test_an_authenticated_client_gets_the_same_404(alice_key):
    client = Client(headers={"Authorization": f"Bearer {alice_key[1]}"})
    response = client.post("/v1/completions", {"prompt": "hi"}, content_type="application/json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "method, path, allowed", [("get", "/v1/user/charge", "POST"), ("post", "/v1/user/balance", "GET")]
)
def test_a_wrong_method_on_a_v1_path_is_a_405_in_the_openai_shape(db, method, path, allowed):
    response = getattr(Client(), method)(path)
    assert response.status_code == 405 and response["Allow"] == allowed and response["X-Request-Id"]
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")
    assert f"{method.upper()} is not allowed here; use {allowed}." == error["message"]


def test_ninjas_docs_and_schema_still_answer(db):
    assert Client().get("/v1/docs").status_code == 200
    schema = Client().get("/v1/openapi.json")
    assert schema.status_code == 200
    assert "/v1/user/charge" in schema.json()["paths"]


def test_a_path_outside_v1_keeps_djangos_own_404(db):
    response = Client().get("/nope")
    assert response.status_code == 404
    assert not response["Content-Type"].startswith("application/json")


@pytest.mark.django_db(transaction=True)
def test_through_the_asgi_app_unknown_paths_are_json_and_the_consumers_still_answer():
    unknown = call("/v1/assistants", {"model": "x"}, token=None)
    assert unknown.status == 404
    assert unknown.error["code"] == "not_found"
    # The streaming endpoints are the Channels consumers, not the catch-all: they ask for a key.
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/responses"):
        response = call(path, {"model": "x"}, token=None)
        assert response.status == 401, path
        assert response.error["code"] == "invalid_api_key"
