"""Files and batches routes on a real database (SQLite and PostgreSQL): limits, OpenAI error
shapes, lifecycle rules; and an oversized upload refused by the real gunicorn server."""

from __future__ import annotations

import io
import json
import os

import openai
import pytest

from genq.settings import Settings
from results_api.app import create_app
from tests.conftest import TINY_MODEL, free_port, make_key
from tests.processes import ProcessGroup, start_api

pytestmark = pytest.mark.integration

LINE = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions",
                   "body": {"model": TINY_MODEL, "prompt": "hi"}}) + "\n"


@pytest.fixture
def api(sqlite_url, tmp_path):
    return make_api(sqlite_url, tmp_path)


@pytest.fixture
def api_on_both_databases(database_url, tmp_path):
    return make_api(database_url, tmp_path)


def make_api(database_url: str, tmp_path, **caps):
    settings = Settings(database_url=database_url, data_dir=tmp_path / "data", model=TINY_MODEL,
                        broker_url="redis://127.0.0.1:1/0", max_file_lines=5,
                        max_file_bytes=4096, **caps)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url)}"
    client.files_dir = tmp_path / "data" / "files"
    return client


def upload(api, content: bytes, purpose: str = "batch"):
    return api.post("/v1/files", data={"purpose": purpose, "file": (io.BytesIO(content),
                                                                    "in.jsonl")},
                    content_type="multipart/form-data")


def create_batch(api, file_id: str, **fields):
    return api.post("/v1/batches", json={"input_file_id": file_id,
                                         "endpoint": "/v1/completions", **fields})


def test_a_file_over_the_line_limit_is_refused_and_not_kept(api):
    response = upload(api, LINE.encode() * 6)

    assert response.status_code == 413
    assert response.get_json()["error"] == {"message": "file over 5 lines", "type":
                                            "invalid_request_error", "param": "file",
                                            "code": "payload_too_large"}
    assert list(api.files_dir.iterdir()) == []


def test_a_file_over_the_byte_limit_is_refused(api):
    response = upload(api, b"x" * 5000)

    assert response.status_code == 413
    assert list(api.files_dir.iterdir()) == []


def test_upload_read_and_delete_a_file(api):
    content = LINE.encode() * 3

    uploaded = upload(api, content).get_json()
    read = api.get(f"/v1/files/{uploaded['id']}").get_json()
    body = api.get(f"/v1/files/{uploaded['id']}/content").data
    deleted = api.delete(f"/v1/files/{uploaded['id']}").get_json()

    assert uploaded["object"] == "file" and uploaded["purpose"] == "batch"
    assert (read["bytes"], read["line_count"], read["filename"]) == (len(content), 3,
                                                                     "in.jsonl")
    assert body == content
    assert deleted == {"id": uploaded["id"], "object": "file", "deleted": True}
    assert api.get(f"/v1/files/{uploaded['id']}").status_code == 404
    assert list(api.files_dir.iterdir()) == []


def test_content_of_a_file_gone_from_disk_is_a_404_not_a_cut_off_200(api):
    # given a file whose content a concurrent DELETE removed after its row was read
    file_id = upload(api, LINE.encode()).get_json()["id"]
    for path in api.files_dir.iterdir():
        path.unlink()

    response = api.get(f"/v1/files/{file_id}/content")

    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "not_found_error"


def test_bad_uploads_get_openai_errors(api):
    wrong_purpose = upload(api, LINE.encode(), purpose="fine-tune")
    not_multipart = api.post("/v1/files", json={"purpose": "batch"})

    assert wrong_purpose.status_code == 422
    assert wrong_purpose.get_json()["error"]["param"] == "purpose"
    assert not_multipart.status_code == 415


def test_nul_characters_get_a_4xx_not_a_500(api_on_both_databases):
    api = api_on_both_databases
    uploaded = api.post("/v1/files", data={"purpose": "batch", "file": (
        io.BytesIO(LINE.encode()), "in\x00.jsonl")}, content_type="multipart/form-data")

    assert uploaded.status_code == 200 and uploaded.get_json()["filename"] == "in.jsonl"
    for path in ["/v1/files/file_%00", "/v1/files/file_%00/content", "/v1/batches/batch_%00",
                 "/v1/batches/batch_%00/cancel"]:
        response = api.post(path) if path.endswith("cancel") else api.get(path)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["type"] == "not_found_error"
    listed = api.get("/v1/batches?after=batch_%00")
    assert (listed.status_code, listed.get_json()["error"]["param"]) == (422, "after")


def test_batch_lifecycle_rules(api_on_both_databases):
    api = api_on_both_databases
    file_id = upload(api, LINE.encode()).get_json()["id"]
    batch = create_batch(api, file_id, completion_window="30m", metadata={"k": "v"}).get_json()

    # a running batch's input file cannot be deleted; retry needs a finished batch
    assert api.delete(f"/v1/files/{file_id}").status_code == 409
    assert api.post(f"/v1/batches/{batch['id']}/retry").status_code == 409
    cancelled = api.post(f"/v1/batches/{batch['id']}/cancel")
    again = api.post(f"/v1/batches/{batch['id']}/cancel")

    assert batch["status"] == "validating"
    assert batch["expires_at"] - batch["created_at"] == 1800
    assert batch["metadata"] == {"k": "v"}
    assert cancelled.get_json()["status"] == "cancelling"
    assert again.status_code == 409
    assert again.get_json()["error"]["type"] == "conflict_error"


@pytest.mark.parametrize(("fields", "param"), [
    ({"input_file_id": "file_nope"}, "file_id"),
    ({"input_file_id": "file_\x00"}, "input_file_id"),  # PostgreSQL cannot compare a NUL
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"completion_window": "2w"}, "completion_window"),
    ({"completion_window": "99999999999999999999h"}, "completion_window"),  # no overflow
    ({"completion_window": "1h\n"}, "completion_window"),
    ({"completion_window": "\u0663h"}, "completion_window"),  # a non-ASCII digit
    ({"extra": 1}, "extra"),
])
def test_invalid_batch_requests(api_on_both_databases, fields, param):
    api = api_on_both_databases
    file_id = upload(api, LINE.encode()).get_json()["id"]

    response = create_batch(api, file_id, **fields)

    assert response.status_code in (404, 422)
    assert response.get_json()["error"]["param"] == param


def test_batches_list_newest_first_with_a_cursor(api_on_both_databases):
    api = api_on_both_databases
    file_id = upload(api, LINE.encode()).get_json()["id"]
    ids = [create_batch(api, file_id).get_json()["id"] for _ in range(3)]

    first = api.get("/v1/batches?limit=2").get_json()
    rest = api.get(f"/v1/batches?limit=2&after={first['last_id']}").get_json()

    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
    assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]


def test_the_batch_list_limit_is_documented_as_enforced(api):
    documented = api.get("/openapi.json").get_json()["paths"]["/v1/batches"]["get"]
    limit = next(p["schema"] for p in documented["parameters"] if p["name"] == "limit")

    for outside in (limit["minimum"] - 1, limit["maximum"] + 1):
        assert api.get(f"/v1/batches?limit={outside}").status_code == 422
    for inside in (limit["minimum"], limit["maximum"]):
        assert api.get(f"/v1/batches?limit={inside}").status_code == 200
    for not_a_number in ("x", "%205", "٣", "²"):
        assert api.get(f"/v1/batches?limit={not_a_number}").status_code == 422


def test_real_server_refuses_an_oversized_upload_with_an_openai_error(
        sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("GENQ_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("GENQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GENQ_MAX_FILE_BYTES", "100000")
    group = ProcessGroup(tmp_path, dict(os.environ))
    port = free_port()
    try:
        start_api(group, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                               api_key=make_key(sqlite_url), max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("big.jsonl", LINE.encode() * 2000), purpose="batch")
    finally:
        group.stop_all()
    assert refused.value.status_code == 413
    assert refused.value.body["code"] == "payload_too_large"
    assert not list((tmp_path / "data" / "files").glob("*"))


def test_a_tenant_cannot_keep_more_files_or_bytes_than_its_caps(database_url, tmp_path):
    # given caps of 3 files and 3 lines' worth of bytes per tenant
    api = make_api(database_url, tmp_path, max_files_per_tenant=3,
                   max_stored_bytes_per_tenant=3 * len(LINE))
    assert upload(api, LINE.encode() * 2).status_code == 200

    # when the bytes would pass the cap: 429, and nothing kept on disk
    over = upload(api, LINE.encode() * 2)
    assert over.status_code == 429 and "bytes in files" in over.get_json()["error"]["message"]
    assert len(list(api.files_dir.iterdir())) == 1

    # when the count would pass the cap: 429; deleting a file makes room again
    kept = upload(api, LINE.encode()).get_json()["id"]
    assert upload(api, b"").status_code == 200
    refused = upload(api, b"")
    assert refused.status_code == 429, refused.get_json()
    assert "3 files (limit 3)" in refused.get_json()["error"]["message"]
    assert api.delete(f"/v1/files/{kept}").status_code == 200
    assert upload(api, b"").status_code == 200


def test_a_tenant_cannot_keep_more_open_batches_than_its_cap(database_url, tmp_path):
    api = make_api(database_url, tmp_path, max_open_batches_per_tenant=2)
    file_id = upload(api, LINE.encode()).get_json()["id"]
    assert [create_batch(api, file_id).status_code for _ in range(2)] == [200, 200]

    refused = create_batch(api, file_id)

    assert refused.status_code == 429
    assert "2 open batches (limit 2)" in refused.get_json()["error"]["message"]
