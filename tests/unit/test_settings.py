"""Settings that other tools rely on: the broker address `genq up` leaves for Celery's own
commands, and the engine's thread count."""

from __future__ import annotations

import os

import pytest

from genq.settings import BROKER_URL_FILE, Settings


def test_the_broker_url_comes_from_the_setting_then_from_genq_up(tmp_path):
    assert Settings(data_dir=tmp_path).broker_url_resolved == ""
    (tmp_path / BROKER_URL_FILE).write_text("redis://127.0.0.1:16379/0\n")
    assert Settings(data_dir=tmp_path).broker_url_resolved == "redis://127.0.0.1:16379/0"
    explicit = Settings(data_dir=tmp_path, broker_url="amqp://h//")
    assert explicit.broker_url_resolved == "amqp://h//"


def test_the_celery_app_finds_the_broker_genq_up_wrote(tmp_path):
    from workers.celery_app import make_celery

    (tmp_path / BROKER_URL_FILE).write_text("redis://127.0.0.1:16379/0\n")
    app = make_celery(Settings(data_dir=tmp_path))
    assert app.conf.broker_url == "redis://127.0.0.1:16379/0"


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 3), (8, 8), (16, 16)])
def test_engine_threads_leave_a_core_on_small_hosts(monkeypatch, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert Settings().engine_threads_resolved == threads
    assert Settings(engine_threads=5).engine_threads_resolved == 5


def test_the_workers_engine_runs_on_the_engine_threads():
    from workers.engine_process import engine_options

    assert engine_options(Settings(engine_threads=3))["num_threads"] == 3
    assert engine_options(Settings())["num_threads"] == Settings().engine_threads_resolved
    assert engine_options(Settings(engine_quantization="int8"))["quantization"] == "int8"
