"""The webhook API and event recording through Flask's test client, on real SQLite and
PostgreSQL: URL checks at submit, endpoints, per-job and per-endpoint filters, events written
in the state change's transaction, the send-time address check, replays and tenant isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from genq import db
from genq.job_store import transition
from genq.models import WebhookDelivery, WebhookEvent
from genq.settings import Settings
from genq.states import JobStatus
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
from tests.webhook_receiver import receiving, webhook_test_broker_url
from workers.webhook_delivery import deliver

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/hook"  # never called: these tests only look at the rows


@pytest.fixture(scope="module")
def model_cache_dir() -> Path:
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    return Path(MODEL_CACHE_DIR)


def make_settings(database_url: str, model_cache_dir: Path, **overrides) -> Settings:
    return Settings(database_url=database_url, broker_url=webhook_test_broker_url(),
                    model=TINY_MODEL, model_cache_dir=model_cache_dir, **overrides)


@pytest.fixture
def settings(sqlite_url, model_cache_dir) -> Settings:
    return make_settings(sqlite_url, model_cache_dir, webhook_allow_private=True)


@pytest.fixture
def client(settings):
    return create_app({"GENQ_SETTINGS": settings}).test_client()


def auth_for(settings: Settings, tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(settings.database_url, tenant)}"}


@pytest.fixture
def auth(settings) -> dict[str, str]:
    return auth_for(settings)


def submit(client, auth, **fields) -> dict:
    response = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2, **fields},
                           headers=auth)
    assert response.status_code == 202, response.json
    return response.json


def move(settings: Settings, job_id: str, *states: JobStatus) -> None:
    for state in states:
        with db.transaction(settings.database_url) as session:
            assert transition(session, job_id, state)


def delivered_types(client, auth, job_id: str) -> list[str]:
    response = client.get(f"/v1/jobs/{job_id}/deliveries", headers=auth)
    assert response.status_code == 200, response.json
    return sorted(d["event_type"] for d in response.json["data"])


@pytest.mark.parametrize("url", [
    "http://2130706433/", "http://0x7f.1/", "http://[::ffff:127.0.0.1]/",
    "http://169.254.169.254/", "http://100.64.0.1/", "http://[fd00::1]/", "http://10.0.0.1/",
    "gopher://example.com/",
])
def test_submit_refuses_private_and_odd_webhook_urls_with_422(sqlite_url, model_cache_dir, url):
    settings = make_settings(sqlite_url, model_cache_dir)  # allow setting off (the default)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = auth_for(settings)
    client.post("/v1/webhook-secret", headers=auth)

    response = client.post("/v1/jobs", json={"prompt": "Hi", "webhook_url": url}, headers=auth)

    assert response.status_code == 422
    assert response.json["error"]["param"] == "webhook_url"


def test_a_job_webhook_needs_the_tenant_secret_first(client, auth):
    response = client.post("/v1/jobs", json={"prompt": "Hi", "webhook_url": HOOK}, headers=auth)
    assert response.status_code == 422
    assert response.json["error"]["param"] == "webhook_url"
    assert "webhook-secret" in response.json["error"]["message"]


def test_webhook_events_without_url_and_unknown_events_are_422(client, auth):
    client.post("/v1/webhook-secret", headers=auth)
    no_url = client.post("/v1/jobs", json={"prompt": "Hi", "webhook_events": ["failed"]},
                         headers=auth)
    unknown = client.post("/v1/jobs", json={"prompt": "Hi", "webhook_url": HOOK,
                                            "webhook_events": ["queued"]}, headers=auth)
    assert no_url.status_code == unknown.status_code == 422
    assert no_url.json["error"]["param"] == "webhook_events"
    assert unknown.json["error"]["param"].startswith("webhook_events")


def test_endpoint_lifecycle_shows_the_secret_once_and_hides_other_tenants(client, auth,
                                                                          settings):
    created = client.post("/v1/webhook-endpoints", json={"url": HOOK, "events": ["failed"]},
                          headers=auth)
    assert created.status_code == 201, created.json
    endpoint = created.json
    assert endpoint["secret"].startswith("whsec_") and endpoint["enabled"]
    path = f"/v1/webhook-endpoints/{endpoint['id']}"

    listed = client.get("/v1/webhook-endpoints", headers=auth).json["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and listed[0]["secret"] is None
    disabled = client.patch(path, json={"enabled": False}, headers=auth).json
    assert disabled["enabled"] is False and disabled["secret"] is None
    rotated = client.post(f"{path}/rotate-secret", headers=auth).json
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != endpoint["secret"]

    other = auth_for(settings, "globex")
    assert client.get(path, headers=other).status_code == 404
    assert client.delete(path, headers=other).status_code == 404
    assert client.get(f"{path}/deliveries", headers=other).status_code == 404

    assert client.delete(path, headers=auth).status_code == 200
    assert client.get(path, headers=auth).status_code == 404
    assert client.get("/v1/webhook-endpoints", headers=auth).json["data"] == []


def test_endpoint_with_a_private_url_is_422_on_url(sqlite_url, model_cache_dir):
    settings = make_settings(sqlite_url, model_cache_dir)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    response = client.post("/v1/webhook-endpoints", json={"url": "http://10.0.0.1/"},
                           headers=auth_for(settings))
    assert response.status_code == 422
    assert response.json["error"]["param"] == "url"


def test_bad_endpoint_input_is_a_clear_4xx_on_every_database(database_url, model_cache_dir):
    settings = make_settings(database_url, model_cache_dir, webhook_allow_private=True)
    client, auth = create_app({"GENQ_SETTINGS": settings}).test_client(), auth_for(settings)
    endpoint_id = client.post("/v1/webhook-endpoints", json={"url": HOOK}, headers=auth).json["id"]
    path = f"/v1/webhook-endpoints/{endpoint_id}"

    # NUL: PostgreSQL text cannot hold it nor compare with it.
    for body, param in [({"url": HOOK + "\x00"}, "url"),
                        ({"url": HOOK, "description": "a\x00b"}, "description")]:
        response = client.post("/v1/webhook-endpoints", json=body, headers=auth)
        assert (response.status_code, response.json["error"]["param"]) == (422, param)
    for missing in ["/v1/webhook-endpoints/whe_%00", "/v1/deliveries/dlv_%00",
                    "/v1/jobs/job_%00/deliveries"]:
        assert client.get(missing, headers=auth).status_code == 404, missing
    # "²" passes str.isdigit() but not int().
    response = client.get(f"{path}/deliveries?limit=²", headers=auth)
    assert (response.status_code, response.json["error"]["param"]) == (422, "limit")
    # A body that is not JSON is a 400, and the document says so.
    response = client.patch(path, data="\x00", content_type="application/json", headers=auth)
    assert (response.status_code, response.json["error"]["code"]) == (400, "invalid_json")
    documented = client.get("/openapi.json").json["paths"]["/v1/webhook-endpoints/{id}"]
    assert "400" in documented["patch"]["responses"]


def test_job_events_are_filtered_per_job(database_url, model_cache_dir):
    settings = make_settings(database_url, model_cache_dir, webhook_allow_private=True)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = auth_for(settings)
    client.post("/v1/webhook-secret", headers=auth)
    chosen = submit(client, auth, webhook_url=HOOK, webhook_events=["running", "succeeded"])
    default = submit(client, auth, webhook_url=HOOK)
    silent = submit(client, auth)

    move(settings, chosen["id"], JobStatus.RUNNING, JobStatus.SUCCEEDED)
    move(settings, default["id"], JobStatus.RUNNING, JobStatus.FAILED)
    move(settings, silent["id"], JobStatus.RUNNING, JobStatus.SUCCEEDED)

    assert delivered_types(client, auth, chosen["id"]) == ["job.running", "job.succeeded"]
    assert delivered_types(client, auth, default["id"]) == ["job.failed"]  # terminal only
    assert delivered_types(client, auth, silent["id"]) == []


def test_job_events_are_filtered_per_endpoint(client, auth, settings):
    failures = client.post("/v1/webhook-endpoints", json={"url": HOOK, "events": ["failed"]},
                           headers=auth).json
    everything = client.post("/v1/webhook-endpoints", json={
        "url": HOOK, "events": ["running", "succeeded", "failed", "canceled", "expired"]},
        headers=auth).json
    switched_off = client.post("/v1/webhook-endpoints", json={"url": HOOK}, headers=auth).json
    client.patch(f"/v1/webhook-endpoints/{switched_off['id']}", json={"enabled": False},
                 headers=auth)
    ok, bad = submit(client, auth), submit(client, auth)

    move(settings, ok["id"], JobStatus.RUNNING, JobStatus.SUCCEEDED)
    move(settings, bad["id"], JobStatus.FAILED)

    def endpoint_types(endpoint) -> list[str]:
        data = client.get(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries",
                          headers=auth).json["data"]
        return sorted(d["event_type"] for d in data)

    assert endpoint_types(failures) == ["job.failed"]
    assert endpoint_types(everything) == ["job.failed", "job.running", "job.succeeded"]
    assert endpoint_types(switched_off) == []



def test_a_lease_reclaim_announces_no_second_running_event(client, auth, settings):
    client.post("/v1/webhook-endpoints", json={"url": HOOK, "events": ["running"]},
                headers=auth)
    job = submit(client, auth)
    move(settings, job["id"], JobStatus.RUNNING)

    with db.transaction(settings.database_url) as session:
        assert transition(session, job["id"], JobStatus.RUNNING, only_from={JobStatus.RUNNING})

    assert delivered_types(client, auth, job["id"]) == ["job.running"]

def test_events_roll_back_with_the_state_change_they_announce(client, auth, settings):
    client.post("/v1/webhook-endpoints", json={"url": HOOK}, headers=auth)
    job = submit(client, auth)

    with pytest.raises(RuntimeError), db.transaction(settings.database_url) as session:
        assert transition(session, job["id"], JobStatus.CANCELED)
        raise RuntimeError("the caller's transaction fails after the transition")

    with db.session_factory(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


def test_cancel_through_the_api_records_the_canceled_event_with_the_job(client, auth):
    client.post("/v1/webhook-secret", headers=auth)
    job = submit(client, auth, webhook_url=HOOK)

    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    [delivery] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).json["data"]
    assert delivery["event_type"] == "job.canceled" and delivery["status"] == "pending"


def test_a_name_that_resolves_to_a_private_address_is_refused_at_send(sqlite_url,
                                                                     model_cache_dir):
    settings = make_settings(sqlite_url, model_cache_dir)  # allow setting off
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = auth_for(settings)
    client.post("/v1/webhook-secret", headers=auth)
    with receiving() as receiver:
        job = submit(client, auth, webhook_url=f"http://localhost:{receiver.port}/hook")
        move(settings, job["id"], JobStatus.FAILED)
        with db.transaction(settings.database_url) as session:
            session.execute(update(WebhookDelivery).values(lease_token="t"))
            delivery_id = session.scalar(select(WebhookDelivery.id))

        deliver(settings, delivery_id, "t")

        assert receiver.requests == []
    delivery = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json
    assert delivery["status"] == "failed"
    assert "resolves to a private or reserved address" in delivery["attempts"][0]["error"]


def test_replay_creates_a_new_delivery_of_the_same_event(client, auth, settings):
    client.post("/v1/webhook-secret", headers=auth)
    job = submit(client, auth, webhook_url=HOOK)
    move(settings, job["id"], JobStatus.FAILED)
    [original] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).json["data"]

    replay = client.post(f"/v1/deliveries/{original['id']}/replay", headers=auth)
    other = client.post(f"/v1/deliveries/{original['id']}/replay",
                        headers=auth_for(settings, "globex"))

    assert replay.status_code == 202
    assert replay.json["event_id"] == original["event_id"]
    assert replay.json["replay_of"] == original["id"] and replay.json["id"] != original["id"]
    assert other.status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/deliveries",
                      headers=auth_for(settings, "globex")).status_code == 404


def test_replay_to_a_disabled_endpoint_is_a_409(client, auth, settings):
    endpoint = client.post("/v1/webhook-endpoints", json={"url": HOOK}, headers=auth).json
    job = submit(client, auth)
    move(settings, job["id"], JobStatus.FAILED)
    [delivery] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).json["data"]
    client.patch(f"/v1/webhook-endpoints/{endpoint['id']}", json={"enabled": False},
                 headers=auth)

    response = client.post(f"/v1/deliveries/{delivery['id']}/replay", headers=auth)

    assert response.status_code == 409
    assert response.json["error"]["code"] == "conflict"


def test_openapi_documents_every_webhook_route(client):
    documented = client.get("/openapi.json").json["paths"]
    rules = [rule for rule in client.application.url_map.iter_rules()
             if rule.endpoint.startswith("webhooks.")]

    for rule in rules:
        path = rule.rule.replace("<endpoint_id>", "{id}").replace("<job_id>", "{id}") \
            .replace("<delivery_id>", "{id}")
        methods = rule.methods - {"HEAD", "OPTIONS"}
        assert {m.lower() for m in methods} <= set(documented[path]), path


def test_a_tenant_has_at_most_its_cap_of_endpoints(sqlite_url, model_cache_dir):
    settings = make_settings(sqlite_url, model_cache_dir, webhook_allow_private=True,
                             max_webhook_endpoints_per_tenant=2)
    client, auth = create_app({"GENQ_SETTINGS": settings}).test_client(), auth_for(settings)
    created = [client.post("/v1/webhook-endpoints", json={"url": HOOK}, headers=auth)
               for _ in range(3)]

    assert [response.status_code for response in created] == [201, 201, 429]
    assert "2 webhook endpoints (limit 2)" in created[2].json["error"]["message"]
    other = client.post("/v1/webhook-endpoints", json={"url": HOOK},
                        headers=auth_for(settings, "globex"))
    assert other.status_code == 201


def test_replays_per_minute_are_capped(sqlite_url, model_cache_dir):
    settings = make_settings(sqlite_url, model_cache_dir, webhook_allow_private=True,
                             webhook_replays_per_minute=3)
    client, auth = create_app({"GENQ_SETTINGS": settings}).test_client(), auth_for(settings)
    client.post("/v1/webhook-secret", headers=auth)
    job = submit(client, auth, webhook_url=HOOK)
    move(settings, job["id"], JobStatus.FAILED)
    [original] = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth).json["data"]

    replays = [client.post(f"/v1/deliveries/{original['id']}/replay", headers=auth)
               for _ in range(4)]

    assert [response.status_code for response in replays] == [202, 202, 202, 429]


def test_a_private_url_refusal_names_the_setting_that_allows_it(sqlite_url, model_cache_dir):
    settings = make_settings(sqlite_url, model_cache_dir)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    response = client.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9000/"},
                           headers=auth_for(settings))
    assert response.status_code == 422
    assert "GENQ_WEBHOOK_ALLOW_PRIVATE" in response.json["error"]["message"]


def test_endpoint_events_may_be_named_as_in_the_payload(client, auth):
    response = client.post("/v1/webhook-endpoints", headers=auth,
                           json={"url": HOOK, "events": ["job.succeeded", "failed"]})
    assert response.status_code == 201, response.json
    assert response.json["events"] == ["succeeded", "failed"]
    refused = client.post("/v1/webhook-endpoints", headers=auth,
                          json={"url": HOOK, "events": ["job.started"]})
    assert refused.status_code == 422
