"""docker-compose.yml is for users; no Docker engine runs here, so a parse checks its shape."""

from pathlib import Path

import yaml

from genq.settings import Settings

COMPOSE = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())


def test_compose_has_the_services_users_need():
    services = COMPOSE["services"]
    assert {"redis", "postgres", "rabbitmq", "api", "worker", "webhook-worker"} <= set(services)
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]


def test_worker_reserves_a_gpu():
    devices = COMPOSE["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_env_vars_are_real_settings():
    known = {f"GENQ_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "webhook-worker"):
        env = COMPOSE["services"][name]["environment"]
        genq_vars = {key for key in env if key.startswith("GENQ_")}
        assert genq_vars, name
        assert genq_vars <= known, genq_vars - known
        assert env["GENQ_DATABASE_URL"].startswith("postgresql://")
        assert env["GENQ_BROKER_URL"].startswith("redis://")
