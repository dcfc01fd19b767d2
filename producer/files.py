"""Files: uploads kept on disk under data_dir/files, and batch output/error files, which are
generated from the jobs table on each download until the batch finishes (partial results).

Rows hold metadata only; content never passes through memory whole.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, or_, select, update

from genq import db
from genq.batch_states import BatchStatus
from genq.errors import ErrorCode, GenqError
from genq.limits import check_cap, lock_tenant
from genq.models import Batch, File, new_id, utcnow
from genq.retention import files_dir
from genq.settings import Settings

PURPOSE_BATCH = "batch"
PURPOSE_BATCH_OUTPUT = "batch_output"
READ_CHUNK_BYTES = 1024 * 1024
MAX_LISTED_FILES = 100


class LineCountingFile(io.FileIO):
    """A file that counts bytes and lines as they are written and refuses to grow past the
    limits, so an oversized upload is stopped while it streams in, not after."""

    def __init__(self, path: Path, max_bytes: int, max_lines: int) -> None:
        super().__init__(path, "w+")
        self.max_bytes, self.max_lines = max_bytes, max_lines
        self.bytes_written = 0
        self.newlines = 0
        self.last_byte = b"\n"

    def write(self, data) -> int:
        data = bytes(data)
        self.bytes_written += len(data)
        self.newlines += data.count(b"\n")
        if data:
            self.last_byte = data[-1:]
        if self.bytes_written > self.max_bytes:
            raise GenqError(ErrorCode.PAYLOAD_TOO_LARGE,
                            f"file over {self.max_bytes} bytes", param="file")
        if self.line_count > self.max_lines:
            raise GenqError(ErrorCode.PAYLOAD_TOO_LARGE,
                            f"file over {self.max_lines} lines", param="file")
        return super().write(data)

    @property
    def line_count(self) -> int:
        return self.newlines + (self.last_byte != b"\n")


def record_upload(settings: Settings, tenant_id: str, file_id: str, filename: str,
                  stored: LineCountingFile) -> File:
    """Insert the row of an upload whose content `stored` already wrote to disk."""
    # The filename is only a label: cut to its column, without the NULs PostgreSQL refuses.
    filename = filename.replace("\x00", "")[:255]
    file = File(id=file_id, tenant_id=tenant_id, purpose=PURPOSE_BATCH,
                filename=filename or "upload.jsonl", bytes=stored.bytes_written,
                line_count=stored.line_count, path=Path(stored.name).name)
    with db.transaction(settings.database_url_resolved) as session:
        lock_tenant(session.connection(), tenant_id)
        count, stored_bytes = session.execute(
            select(func.count(), func.coalesce(func.sum(File.bytes), 0)).where(
                File.tenant_id == tenant_id, File.purpose == PURPOSE_BATCH,
                File.deleted_at.is_(None))).one()
        advice = "delete files you no longer need (DELETE /v1/files/{id})"
        check_cap(count, 1, settings.max_files_per_tenant, "files", advice)
        check_cap(stored_bytes, file.bytes, settings.max_stored_bytes_per_tenant,
                  "bytes in files", advice)
        session.add(file)
    return file


def upload_path(settings: Settings) -> tuple[str, Path]:
    file_id = new_id("file")
    return file_id, files_dir(settings) / f"{file_id}.jsonl"


def new_generated_file(tenant_id: str, filename: str) -> File:
    return File(tenant_id=tenant_id, purpose=PURPOSE_BATCH_OUTPUT, filename=filename)


def get_file(settings: Settings, tenant_id: str, file_id: str) -> File:
    with db.session_factory(settings.database_url_resolved)() as session:
        file = session.get(File, file_id)
    if file is None or file.tenant_id != tenant_id or file.deleted_at is not None:
        raise GenqError(ErrorCode.NOT_FOUND, f"no file with id {file_id!r}", param="file_id")
    return file


def list_files(settings: Settings, tenant_id: str) -> list[File]:
    """The tenant's newest MAX_LISTED_FILES files."""
    with db.session_factory(settings.database_url_resolved)() as session:
        return list(session.scalars(
            select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
            .order_by(File.id.desc()).limit(MAX_LISTED_FILES)))


def delete_file(settings: Settings, tenant_id: str, file_id: str) -> File:
    """Delete a file's content; a file an unfinished batch still reads or writes is a 409."""
    file = get_file(settings, tenant_id, file_id)
    with db.transaction(settings.database_url_resolved) as session:
        users = session.scalars(select(Batch.status).where(or_(
            Batch.input_file_id == file_id, Batch.output_file_id == file_id,
            Batch.error_file_id == file_id))).all()
        if any(not BatchStatus(status).is_terminal for status in users):
            raise GenqError(ErrorCode.CONFLICT,
                            f"file {file_id!r} belongs to a batch that is still running",
                            param="file_id")
        session.execute(update(File).where(File.id == file_id).values(deleted_at=utcnow()))
    if file.path:
        (files_dir(settings) / file.path).unlink(missing_ok=True)
    return file


def iter_stored_content(settings: Settings, file: File) -> Iterator[bytes]:
    """The bytes of a file kept on disk, in chunks. Opened now, before the answer starts: a
    file deleted since its row was read is a 404, not a 200 cut off mid-stream."""
    try:
        handle = (files_dir(settings) / file.path).open("rb")
    except FileNotFoundError:
        raise GenqError(ErrorCode.NOT_FOUND, f"no file with id {file.id!r}",
                        param="file_id") from None
    return _chunks(handle)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(READ_CHUNK_BYTES):
            yield chunk
