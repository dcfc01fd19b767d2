"""The /v1/files routes (OpenAI shapes): upload a JSONL file streamed straight to disk, read
its metadata or content, list, delete."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from werkzeug.formparser import parse_form_data

from genq.errors import ErrorCode, GenqError
from producer.batch_results import iter_generated_file
from producer.batch_schemas import FileDeleted, FileObject
from producer.files import (
    PURPOSE_BATCH,
    LineCountingFile,
    delete_file,
    get_file,
    iter_stored_content,
    list_files,
    record_upload,
    upload_path,
)
from results_api.context import authenticate, current_settings, current_tenant_id
from results_api.openai_errors import register_openai_errors

# Room for the multipart boundaries and the small form fields around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Werkzeug also applies this to its parse buffer (64 KiB reads plus a partial boundary), so it
# must stay well above the read size; it bounds memory per upload, never the file's size.
MAX_FORM_MEMORY_BYTES = 1024 * 1024

bp = Blueprint("files", __name__, url_prefix="/v1")
register_openai_errors(bp)
bp.before_request(authenticate)


@bp.post("/files")
def upload() -> tuple[Response, int]:
    settings = current_settings()
    if request.mimetype != "multipart/form-data":
        raise GenqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                        "upload the file as multipart/form-data (fields `file` and `purpose`)")
    file_id, path = upload_path(settings)
    stored: list[LineCountingFile] = []

    def stream_to_disk(total_content_length, content_type, filename, content_length=None):
        # Werkzeug hands every file part to this: the upload goes to disk chunk by chunk.
        if stored:
            raise GenqError(ErrorCode.INVALID_REQUEST, "send exactly one file", param="file")
        stored.append(LineCountingFile(path, settings.max_file_bytes, settings.max_file_lines))
        return stored[0]

    try:
        _, form, files = parse_form_data(
            request.environ, stream_factory=stream_to_disk,
            max_content_length=settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES,
            max_form_memory_size=MAX_FORM_MEMORY_BYTES,
        )
        if form.get("purpose") != PURPOSE_BATCH:
            raise GenqError(ErrorCode.INVALID_REQUEST,
                            f"purpose must be {PURPOSE_BATCH!r}", param="purpose")
        if "file" not in files or not stored:
            raise GenqError(ErrorCode.INVALID_REQUEST, "the `file` field is missing",
                            param="file")
        stored[0].close()
        file = record_upload(settings, current_tenant_id(), file_id, files["file"].filename
                             or "upload.jsonl", stored[0])
    except BaseException:
        for handle in stored:
            handle.close()
        path.unlink(missing_ok=True)
        raise
    return jsonify(FileObject.from_file(file).model_dump(mode="json")), 200


@bp.get("/files")
def read_files() -> Response:
    files = list_files(current_settings(), current_tenant_id())
    return jsonify({"object": "list", "has_more": False,
                    "data": [FileObject.from_file(f).model_dump(mode="json") for f in files]})


@bp.get("/files/<file_id>")
def read_file(file_id: str) -> Response:
    file = get_file(current_settings(), current_tenant_id(), file_id)
    return jsonify(FileObject.from_file(file).model_dump(mode="json"))


@bp.get("/files/<file_id>/content")
def read_content(file_id: str) -> Response:
    """A batch's output or error file can be read while the batch runs: the lines finished so
    far, generated from the database."""
    settings = current_settings()
    file = get_file(settings, current_tenant_id(), file_id)
    chunks = (iter_stored_content(settings, file) if file.path
              else iter_generated_file(settings, file.id))
    return Response(chunks, mimetype="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{file.id}.jsonl"'})


@bp.delete("/files/<file_id>")
def remove_file(file_id: str) -> Response:
    file = delete_file(current_settings(), current_tenant_id(), file_id)
    return jsonify(FileDeleted(id=file.id).model_dump(mode="json"))
