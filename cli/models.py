"""`genq models route | rollback | unroute | show`: each model's versions and routing rule,
straight on the database (genq.routing); every API process applies a new rule within a second."""

from __future__ import annotations

import click

from cli.context import CommandFailed, console, existing_database_url
from genq.settings import get_settings


@click.group()
def models() -> None:
    """Route a model's jobs to its versions (canary)."""


@models.command("route")
@click.argument("model")
@click.argument("weights", nargs=-1, required=True)
@click.option("--sticky", default=None, metavar="tenant|field:NAME",
              help="Keep a tenant, or a metadata field's value, on one version.")
@click.option("--when-unserved", type=click.Choice(["reroute", "wait"]), default="reroute",
              show_default=True,
              help="A version with no live worker: its share goes to the others, or waits.")
def route(model: str, weights: tuple[str, ...], sticky: str | None, when_unserved: str) -> None:
    """Send MODEL's jobs to versions by WEIGHTS (v1=90 v2=10).

    Workers serve a version with `genq worker --model MODEL --model-version v2`.
    """
    from genq import db, routing

    try:
        rule = routing.RoutingRule(model, routing.parse_weights(list(weights)),
                                   routing.parse_sticky(sticky), when_unserved)
        with db.transaction(existing_database_url(get_settings())) as session:
            rule = routing.set_rule(session, rule)
    except routing.RuleError as exc:
        raise CommandFailed("invalid_rule", str(exc)) from None
    console.print(f"[green]routing[/] {rule.describe()}")


@models.command("rollback")
@click.argument("model")
def rollback(model: str) -> None:
    """Put 100% of MODEL on the previous rule's main version."""
    from genq import db, routing

    try:
        with db.transaction(existing_database_url(get_settings())) as session:
            rule = routing.rollback(session, model)
    except routing.RuleError as exc:
        raise CommandFailed("no_previous_rule", str(exc)) from None
    console.print(f"[green]rolled back[/] {rule.describe()}")


@models.command("unroute")
@click.argument("model")
def unroute(model: str) -> None:
    """Stop routing MODEL: new jobs go to unversioned workers.

    Start a worker without --model-version first: versioned ones do not take them.
    """
    from genq import db, routing

    with db.transaction(existing_database_url(get_settings())) as session:
        rule = routing.set_rule(session, routing.RoutingRule(model, ()))
    console.print(f"[green]routing off[/] {rule.describe()}")


@models.command("show")
@click.argument("model", required=False)
def show(model: str | None) -> None:
    """Print the rules in force, or MODEL's rule history."""
    from genq import db, routing

    with db.session_factory(existing_database_url(get_settings()))() as session:
        rules = (routing.rule_history(session, model) if model
                 else sorted(routing.current_rules(session).values(), key=lambda r: r.model))
    if not rules:
        raise CommandFailed("not_found", f"no routing rule for {model!r}" if model
                            else "no model has a routing rule")
    for rule in rules:
        when = f"{rule.created_at:%Y-%m-%d %H:%M:%S} " if rule.created_at else ""
        click.echo(f"{when}{rule.describe()}")
