"""Read a batch input file line by line (bounded memory) and validate each line on its own, so
one bad line becomes one error with its line number instead of sinking the batch.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {…}}`.
Blank lines are skipped; CRLF endings and a UTF-8 byte-order mark are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from genq.states import Priority
from producer.openai_compat import parse_body
from producer.schemas import JobRequest

MAX_CUSTOM_ID_LENGTH = 512
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ParsedLine:
    """One non-blank input line: a request to run, or the reason it cannot run."""

    number: int  # 1-based physical line number in the file
    custom_id: str | None
    request: JobRequest | None = None
    error: str | None = None


def parse_batch_file(path: Path, endpoint: str) -> Iterator[ParsedLine]:
    """Yield every non-blank line of `path`, validated against `endpoint`.

    Memory is one line plus the set of custom_ids seen (bounded by the file line limit), which
    is what detecting a duplicate `custom_id` needs.
    """
    first_line_of: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            if not raw.strip():
                continue
            parsed = parse_line(number, raw.rstrip(b"\r\n"), endpoint)
            if parsed.custom_id is not None and parsed.error is None:
                first = first_line_of.setdefault(parsed.custom_id, number)
                if first != number:
                    parsed = ParsedLine(number, parsed.custom_id,
                                        error=f"duplicate custom_id {parsed.custom_id!r} "
                                              f"(first used on line {first})")
            yield parsed


def parse_line(number: int, raw: bytes, endpoint: str) -> ParsedLine:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParsedLine(number, None, error=f"not valid UTF-8 ({exc.reason} at byte "
                                              f"{exc.start})")
    try:
        line = json.loads(text)
    except json.JSONDecodeError as exc:
        return ParsedLine(number, None, error=f"not valid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(line, dict):
        return ParsedLine(number, None, error="a line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return ParsedLine(number, None, error="missing custom_id: a non-empty string is required")
    if len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        return ParsedLine(number, None, error=f"custom_id longer than {MAX_CUSTOM_ID_LENGTH}")
    if "\x00" in custom_id:  # PostgreSQL cannot store it: the whole ingest would fail
        return ParsedLine(number, None, error="custom_id must not contain NUL (\\u0000)")
    unknown = sorted(set(line) - {"custom_id", "method", "url", "body"})
    if unknown:
        return ParsedLine(number, custom_id, error=f"unknown field(s) {', '.join(unknown)}")
    if line.get("method") != "POST":
        return ParsedLine(number, custom_id,
                          error=f"method must be \"POST\", got {line.get('method')!r}")
    if line.get("url") != endpoint:
        return ParsedLine(number, custom_id,
                          error=f"url must be the batch's endpoint {endpoint!r}, "
                                f"got {line.get('url')!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        return ParsedLine(number, custom_id, error="body must be a JSON object")
    try:
        request = parse_body(endpoint, body, Priority.BATCH)
    except ValidationError as exc:
        return ParsedLine(number, custom_id, error=f"invalid body: {_first_error(exc)}")
    return ParsedLine(number, custom_id, request=request)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown field {location!r}"
    return f"{location}: {first['msg']}" if location else first["msg"]
