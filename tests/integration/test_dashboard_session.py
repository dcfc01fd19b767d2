"""The dashboard's sign-in: a signed session holding the key's id (never the key), a CSRF token
on the form, no framing, and a revoked key ends the session at once."""

from __future__ import annotations

import re

import pytest

from genq import db
from genq.api_keys import active_key, revoke_api_key
from genq.settings import Settings
from results_api.app import create_app
from tests.conftest import TINY_MODEL, make_key

pytestmark = pytest.mark.integration


@pytest.fixture
def app_and_key(sqlite_url, tmp_path):
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, model=TINY_MODEL,
                        broker_url="redis://127.0.0.1:1/0")
    return create_app({"GENQ_SETTINGS": settings}), make_key(sqlite_url), sqlite_url


def _csrf(client) -> str:
    page = client.get("/dashboard").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_sign_in_keeps_the_keys_id_in_a_signed_session_not_the_key(app_and_key):
    app, key, database_url = app_and_key
    client = app.test_client()

    signed_in = client.post("/dashboard/sign-in", data={"key": key, "csrf_token": _csrf(client)})

    assert signed_in.status_code == 302
    cookies = signed_in.headers.getlist("Set-Cookie")
    assert cookies and all(key not in cookie for cookie in cookies)
    assert any("HttpOnly" in c and "SameSite=Strict" in c for c in cookies)
    page = client.get("/dashboard")
    assert "Your recent jobs" in page.get_data(as_text=True)

    # when the key is revoked: the very next page is the sign-in form again
    with db.transaction(database_url) as session:
        assert revoke_api_key(session, active_key(session, key).id)
    assert "Your recent jobs" not in client.get("/dashboard").get_data(as_text=True)


def test_sign_in_without_the_forms_csrf_token_is_refused(app_and_key):
    app, key, _ = app_and_key
    client = app.test_client()
    client.get("/dashboard")

    forged = client.post("/dashboard/sign-in", data={"key": key})
    wrong = client.post("/dashboard/sign-in", data={"key": key, "csrf_token": "guess"})

    assert forged.status_code == 422 and wrong.status_code == 422
    assert "Your recent jobs" not in client.get("/dashboard").get_data(as_text=True)


def test_dashboard_pages_cannot_be_framed(app_and_key):
    app, _, _ = app_and_key
    response = app.test_client().get("/dashboard")
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_a_revoked_key_gets_401_at_once_on_every_api_process(app_and_key, sqlite_url, tmp_path):
    first, key, database_url = app_and_key
    second = create_app({"GENQ_SETTINGS": first.config["GENQ_SETTINGS"]})
    auth = {"Authorization": f"Bearer {key}"}
    assert [app.test_client().get("/v1/jobs", headers=auth).status_code
            for app in (first, second)] == [200, 200]

    with db.transaction(database_url) as session:
        assert revoke_api_key(session, active_key(session, key).id)

    assert [app.test_client().get("/v1/jobs", headers=auth).status_code
            for app in (first, second)] == [401, 401]


def test_metrics_need_the_bearer_token_when_one_is_set(sqlite_url, tmp_path):
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, model=TINY_MODEL,
                        broker_url="redis://127.0.0.1:1/0", metrics_token="s3cret")
    client = create_app({"GENQ_SETTINGS": settings}).test_client()

    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert scraped.status_code == 200 and b"genq_queue_depth" in scraped.data
