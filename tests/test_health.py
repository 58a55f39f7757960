"""/healthz (process up) and /readyz (database, channel layer, upstream configuration, and each
upstream's circuit breaker — tests/test_upstreams_failover.py drives those)."""

from __future__ import annotations

import httpx
import pytest
from django.db import OperationalError, connection

from tests.live import BASE_DIR, live_server

# The settings upstream (OpenRouter by default) in a process that has sent it nothing yet.
CLOSED = {"kind": "openrouter", "breaker": "closed", "failures": 0, "in_flight": 0}


def test_healthz_answers_ok_without_touching_anything(client, db, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["X-Request-Id"].startswith("req_")


def test_healthz_echoes_a_sane_client_request_id(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="lb-probe-42")

    assert response["X-Request-Id"] == "lb-probe-42"


def test_readyz_reports_every_check_and_demo_mode_without_an_upstream_key(client, db, settings):
    settings.UPSTREAM_API_KEY = ""

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "channel_layer": "ok", "upstream": "demo"},
        "upstreams": {"default": CLOSED},
    }
    assert response["X-Request-Id"]


def test_readyz_reports_a_configured_upstream_as_ok(client, db, settings):
    settings.UPSTREAM_API_KEY = "sk-or-test"
    settings.UPSTREAM_BASE_URL = "https://openrouter.ai/api/v1"

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["checks"]["upstream"] == "ok"


def test_readyz_is_unavailable_when_the_upstream_url_is_not_http(client, db, settings):
    settings.UPSTREAM_API_KEY = "sk-or-test"
    settings.UPSTREAM_BASE_URL = "ftp://example.invalid"

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["checks"]["upstream"].startswith("error")


def test_readyz_is_unavailable_when_the_database_cannot_be_queried(client, db, settings, monkeypatch):
    settings.UPSTREAM_API_KEY = ""

    def unreachable_database(*args, **kwargs):
        raise OperationalError("connection refused")

    # Stands in for a database that has gone away: the outside world, not the probe, is faked.
    monkeypatch.setattr(connection, "cursor", unreachable_database)
    response = client.get("/readyz")
    monkeypatch.undo()

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "error: OperationalError", "channel_layer": "ok", "upstream": "demo"},
        "upstreams": {"default": CLOSED},  # the settings upstream is all it can know of without a database
    }


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_probes_only_answer_get(client, db, method):
    assert getattr(client, method)("/healthz").status_code == 405
    assert getattr(client, method)("/readyz").status_code == 405


@pytest.mark.django_db(transaction=True)
def test_the_server_process_answers_the_probes_and_serves_static_files():
    with live_server(UPSTREAM_API_KEY="") as url:
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "channel_layer": "ok", "upstream": "demo"}
        css = httpx.get(url + "/static/portal.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.content == (BASE_DIR / "static" / "portal.css").read_bytes()
        assert httpx.get(url + "/static/admin/css/base.css").status_code == 200
