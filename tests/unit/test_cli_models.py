"""`genq models route | rollback | show` on a real SQLite file: rules set, rolled back and
listed, one-line errors, help within 80 columns."""

from __future__ import annotations

import pytest

from tests.unit.test_cli import assert_one_line_error, genq


@pytest.mark.parametrize("command", [["models"], ["models", "route"], ["models", "rollback"],
                                     ["models", "show"], ["models", "unroute"],
                                     ["worker"]])
def test_models_help_fits_80_columns(command, tmp_path):
    result = genq(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout


def test_route_then_rollback_then_show_the_history(tmp_path, sqlite_url):
    env = {"GENQ_DATABASE_URL": sqlite_url}
    for weights in (["v1=100"], ["v1=90", "v2=10", "--sticky", "field:user"]):
        routed = genq("models", "route", "smollm2-135m", *weights, cwd=tmp_path, **env)
        assert routed.returncode == 0, routed.stderr

    rolled = genq("models", "rollback", "smollm2-135m", cwd=tmp_path, **env)
    shown = genq("models", "show", "smollm2-135m", cwd=tmp_path, **env)

    assert rolled.returncode == 0 and "v1=100 sticky=field:user" in rolled.stderr, rolled
    assert [line.split(" ", 2)[2] for line in shown.stdout.splitlines()] == [
        "smollm2-135m: v1=100 sticky=field:user when-unserved=reroute",
        "smollm2-135m: v1=90 v2=10 sticky=field:user when-unserved=reroute",
        "smollm2-135m: v1=100 when-unserved=reroute",
    ]
    in_force = genq("models", "show", cwd=tmp_path, **env).stdout.splitlines()
    assert len(in_force) == 1 and in_force[0].endswith("smollm2-135m: v1=100 sticky=field:user "
                                                       "when-unserved=reroute")


@pytest.mark.parametrize(("command", "code"), [
    (["route", "m", "v1=ninety"], "invalid_rule"),
    (["route", "m", "v1=0", "v2=0"], "invalid_rule"),
    (["route", "m", "v1=50", "--sticky", "user"], "invalid_rule"),
    (["rollback", "m"], "no_previous_rule"),
    (["show", "m"], "not_found"),
    (["show"], "not_found"),
])
def test_models_errors_are_one_line(command, code, tmp_path, sqlite_url):
    result = genq("models", *command, cwd=tmp_path, GENQ_DATABASE_URL=sqlite_url)

    assert_one_line_error(result, code)


def test_models_refuses_a_missing_database(tmp_path):
    assert_one_line_error(genq("models", "route", "m", "v1=1", cwd=tmp_path), "no_database")
    assert not (tmp_path / ".genq").exists()


def test_worker_refuses_a_bad_version_name(tmp_path):
    result = genq("worker", "--model-version", "v 2", cwd=tmp_path,
                  GENQ_BROKER_URL="redis://127.0.0.1:9/0", GENQ_DATABASE_URL="sqlite://")
    assert result.returncode == 2 and "--model-version" in result.stderr, result


def test_unroute_turns_routing_off_and_rollback_restores_the_rule_before(tmp_path, sqlite_url):
    env = {"GENQ_DATABASE_URL": sqlite_url}
    assert genq("models", "route", "m", "v1=60", "v2=40", cwd=tmp_path, **env).returncode == 0

    unrouted = genq("models", "unroute", "m", cwd=tmp_path, **env)
    in_force = genq("models", "show", cwd=tmp_path, **env)
    rolled = genq("models", "rollback", "m", cwd=tmp_path, **env)

    assert unrouted.returncode == 0 and "m: off" in unrouted.stderr, unrouted
    assert_one_line_error(in_force, "not_found")
    assert rolled.returncode == 0 and "m: v1=100" in rolled.stderr, rolled
