"""Bulk generation: ingest rate, end-to-end batch completion rate, and the system's share of
end-to-end time against the engine alone.

    python -m benchmarks.bulk [--ingest-lines 50000] [--e2e-lines 5000] [--concurrency 32]
        [--broker-url redis://…/6] [--real-model smollm2-135m --real-lines 64
        --real-max-tokens 32] [--json PATH]

- ingest: a JSONL file of chat lines turned into job rows by the batch feeder's ingest,
  in this process (SQLite), lines/s.
- e2e echo: a batch of completion lines through a real `genq worker` (echo engine, which
  answers at once), from batch creation to `completed`: lines/s, i.e. the job system's cost.
- real model (optional): the same completion lines through the whole system vs the engine's
  offline `LLM.generate` on the same prompts and sampling params (greedy, same outputs):
  ratio of output tokens/s (target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import redis
from sqlalchemy import func, select

from benchmarks.queue_overhead import REPO, _start_worker
from genq import db
from genq.api_keys import create_api_key, tenant_id_for_key
from genq.batch_states import BatchStatus
from genq.models import Batch, Job
from genq.settings import Settings
from producer.batch_feeder import ingest_batch
from producer.batch_schemas import BatchCreateRequest
from producer.batches import create_batch
from producer.files import LineCountingFile, record_upload, upload_path


def write_lines(path: Path, count: int, endpoint: str, model: str, max_tokens: int) -> Path:
    with path.open("w") as handle:
        for number in range(count):
            if endpoint == "/v1/chat/completions":
                body = {"messages": [{"role": "user", "content": f"Summarize item {number}"}]}
            else:
                body = {"prompt": f"Write a short story about item {number}."}
            handle.write(json.dumps({"custom_id": f"line-{number}", "method": "POST",
                                     "url": endpoint, "body": {"model": model, "temperature": 0,
                                                               "max_tokens": max_tokens,
                                                               **body}}) + "\n")
    return path


def start_batch(settings: Settings, source: Path, endpoint: str) -> str:
    """Upload `source` as the API would (stream it to the files dir) and create a batch."""
    with db.transaction(settings.database_url_resolved) as session:
        tenant_id = tenant_id_for_key(session, create_api_key(session, "bench"))
    file_id, path = upload_path(settings)
    with source.open("rb") as reader, LineCountingFile(
            path, settings.max_file_bytes, settings.max_file_lines) as stored:
        shutil.copyfileobj(reader, stored)
    record_upload(settings, tenant_id, file_id, source.name, stored)
    return create_batch(settings, tenant_id, BatchCreateRequest(
        input_file_id=file_id, endpoint=endpoint)).id


def measure_ingest(workdir: Path, lines: int) -> dict:
    settings = Settings(database_url=f"sqlite:///{workdir / 'ingest.db'}", data_dir=workdir,
                        model="echo", max_file_lines=max(lines, 50_000))
    db.upgrade(settings.database_url_resolved)
    source = write_lines(workdir / "ingest.jsonl", lines, "/v1/chat/completions", "echo", 8)
    batch_id = start_batch(settings, source, "/v1/chat/completions")
    started = time.perf_counter()
    ingest_batch(settings, batch_id)
    seconds = time.perf_counter() - started
    return {"lines": lines, "seconds": seconds, "lines_per_s": lines / seconds}


def run_batch(settings: Settings, workdir: Path, label: str, lines: int, max_tokens: int,
              concurrency: int) -> dict:
    """A batch of completion lines through a real worker (its feeder ingests and enqueues)."""
    db.upgrade(settings.database_url_resolved)
    redis.Redis.from_url(settings.broker_url).flushdb()
    source = write_lines(workdir / f"{label}.jsonl", lines, "/v1/completions", settings.model,
                         max_tokens)
    worker = _start_worker(settings, concurrency, workdir / f"{label}.log")
    try:
        started = time.perf_counter()
        batch_id = start_batch(settings, source, "/v1/completions")
        while (batch := _batch(settings, batch_id)).status != BatchStatus.COMPLETED.value:
            if BatchStatus(batch.status).is_terminal:
                raise RuntimeError(f"batch ended {batch.status}")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(60)
    with db.session_factory(settings.database_url_resolved)() as session:
        tokens = session.scalar(select(func.sum(Job.completion_tokens))
                                .where(Job.batch_id == batch_id))
    return {"lines": lines, "seconds": seconds, "lines_per_s": lines / seconds,
            "output_tokens": tokens, "output_tok_s": tokens / seconds}


def engine_offline(model: str, lines: int, max_tokens: int, cache_dir: str) -> dict:
    from engine import LLM, SamplingParams

    prompts = [f"Write a short story about item {number}." for number in range(lines)]
    llm = LLM(model, cache_dir=cache_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up, as the worker does
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}


def _batch(settings: Settings, batch_id: str) -> Batch:
    with db.session_factory(settings.database_url_resolved)() as session:
        return session.get(Batch, batch_id)


def _settings(args, workdir: Path, model: str) -> Settings:
    workdir.mkdir(parents=True)
    return Settings(database_url=f"sqlite:///{workdir / 'bench.db'}", data_dir=workdir,
                    broker_url=args.broker_url, model=model,
                    model_cache_dir=Path(args.model_cache_dir), batch_window_jobs=args.window,
                    batch_feeder_interval_seconds=0.2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest-lines", type=int, default=50_000)
    parser.add_argument("--e2e-lines", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--model-cache-dir", default=str(REPO / ".genq" / "models"))
    parser.add_argument("--real-model", default="")
    parser.add_argument("--real-lines", type=int, default=64)
    parser.add_argument("--real-max-tokens", type=int, default=32)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The worker subprocesses read the window and feeder interval from the environment.
    os.environ["GENQ_BATCH_WINDOW_JOBS"] = str(args.window)
    os.environ["GENQ_BATCH_FEEDER_INTERVAL_SECONDS"] = "0.2"

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="genq-bulk-") as tmp:
        workdir = Path(tmp)
        results["ingest"] = measure_ingest(workdir, args.ingest_lines)
        echo = _settings(args, workdir / "echo", "echo")
        results["e2e_echo"] = run_batch(echo, echo.data_dir, "echo", args.e2e_lines, 8,
                                        args.concurrency)
        if args.real_model:
            real = _settings(args, workdir / "real", args.real_model)
            results["e2e_real"] = run_batch(real, real.data_dir, "real", args.real_lines,
                                            args.real_max_tokens, args.concurrency)
            results["engine_offline"] = engine_offline(args.real_model, args.real_lines,
                                                       args.real_max_tokens,
                                                       args.model_cache_dir)
            results["e2e_vs_offline_tok_s"] = (results["e2e_real"]["output_tok_s"]
                                               / results["engine_offline"]["output_tok_s"])
    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _print_table(results: dict) -> None:
    ingest, echo = results["ingest"], results["e2e_echo"]
    print(f"{'measure':<38}{'value':>14}")
    print(f"{'ingest, lines/s (' + str(ingest['lines']) + ' lines)':<38}"
          f"{ingest['lines_per_s']:>14.0f}")
    print(f"{'e2e echo engine, lines/s (' + str(echo['lines']) + ')':<38}"
          f"{echo['lines_per_s']:>14.1f}")
    if "e2e_real" in results:
        print(f"{'e2e real model, output tok/s':<38}{results['e2e_real']['output_tok_s']:>14.1f}")
        print(f"{'engine offline, output tok/s':<38}"
              f"{results['engine_offline']['output_tok_s']:>14.1f}")
        print(f"{'ratio e2e / offline (target >= 0.95)':<38}"
              f"{results['e2e_vs_offline_tok_s']:>14.2f}")


if __name__ == "__main__":
    main()
