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


ROOT = Path(__file__).parents[2]


def test_compose_publishes_neither_redis_nor_postgres_nor_rabbitmq():
    for name in ("redis", "postgres", "rabbitmq"):
        assert "ports" not in COMPOSE["services"][name], name


def test_compose_takes_every_password_from_the_environment():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "genq:genq@" not in text
    postgres = COMPOSE["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    redis = COMPOSE["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    env = COMPOSE["services"]["api"]["environment"]
    assert "${REDIS_PASSWORD:?" in env["GENQ_BROKER_URL"]
    assert "${POSTGRES_PASSWORD:?" in env["GENQ_DATABASE_URL"]


def test_the_image_runs_as_a_non_root_user():
    instructions = [line.split(None, 1) for line in (ROOT / "Dockerfile").read_text().splitlines()
                    if line.strip() and not line.startswith((" ", "#"))]
    users = [argument.strip() for keyword, argument in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in instructions[last_user:])


def test_the_build_context_leaves_out_local_data_environments_and_history():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text()
               .splitlines() if line.strip() and not line.startswith("#")}
    assert {".genq", ".venv", ".git"} <= ignored
