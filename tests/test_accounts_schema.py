"""The OpenAPI schema covers the accounts API without generator warnings, and the docs render."""

from __future__ import annotations

from drf_spectacular.drainage import GENERATOR_STATS


def test_the_schema_documents_the_accounts_endpoints_without_warnings(client, db):
    GENERATOR_STATS.reset()

    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert set(paths["/api/auth/signup"]) == {"post"}
    assert set(paths["/api/auth/token"]) == {"post"}
    assert set(paths["/api/auth/token/refresh"]) == {"post"}
    assert set(paths["/api/auth/logout"]) == {"post"}
    assert set(paths["/api/keys"]) == {"get", "post"}
    assert set(paths["/api/keys/{id}"]) == {"get", "patch", "delete"}
    assert set(paths["/api/auth/device"]) == set(paths["/api/auth/device/token"]) == {"post"}
    assert set(paths["/api/auth/me"]) == {"get"}
    assert set(paths["/api/auth/sessions"]) == {"get"}
    assert set(paths["/api/auth/sessions/{id}"]) == {"delete"}
    assert set(paths["/api/auth/web-link"]) == {"post"}
    assert set(paths["/api/runs/{run}"]) == {"get"}
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "key" in schema["components"]["schemas"]["ApiKeyCreated"]["properties"]
    assert "key" not in schema["components"]["schemas"]["ApiKey"]["properties"]
    ours = [msg for msg in [*GENERATOR_STATS._warn_cache, *GENERATOR_STATS._error_cache] if "accounts" in msg]
    assert ours == []


def test_the_api_docs_page_renders(client, db):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    assert "swagger" in response.content.decode().lower()
