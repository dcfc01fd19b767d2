"""`genq keys` and `genq tenants`: administration straight on the database (no API needed).
Each command needs the existing database and never creates one (genq.db loads in the command:
it brings Alembic, a second of start-up for every other command)."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from cli.context import CommandFailed, console, existing_database_url
from genq.settings import get_settings


@click.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.argument("tenant")
def keys_create(tenant: str) -> None:
    """Create a key for TENANT; printed once, last line.

    A new TENANT is created too."""
    from genq import db
    from genq.api_keys import create_api_key

    with db.transaction(existing_database_url(get_settings())) as session:
        key = create_api_key(session, tenant)
    console.print(f"API key for tenant [bold]{tenant}[/] (shown once, store it now):")
    click.echo(key)


@keys.command("list")
@click.argument("tenant")
def keys_list(tenant: str) -> None:
    """List TENANT's keys: id, visible prefix, created, revoked."""
    from genq import db
    from genq.api_keys import list_api_keys

    with db.transaction(existing_database_url(get_settings())) as session:
        found = list_api_keys(session, tenant)
    if found is None:
        raise CommandFailed("not_found", f"no tenant named {tenant!r}")
    click.echo(json.dumps(found, indent=2, default=str))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke key KEY_ID; the API refuses it from now on."""
    from genq import db
    from genq.api_keys import revoke_api_key

    with db.transaction(existing_database_url(get_settings())) as session:
        revoked = revoke_api_key(session, key_id)
    if revoked is None:
        raise CommandFailed("not_found", f"no API key with id {key_id!r}")
    click.echo(json.dumps(revoked, indent=2, default=str))


@click.group()
def tenants() -> None:
    """Tenants and their admission limits."""


@tenants.command("set-limits")
@click.argument("tenant")
@click.option("--requests-per-minute", "--rpm", type=click.IntRange(min=0), default=None)
@click.option("--tokens-per-minute", "--tpm", type=click.IntRange(min=0), default=None,
              help="Prompt tokens + max_tokens, counted at admission.")
@click.option("--max-queued-jobs", type=click.IntRange(min=0), default=None)
@click.option("--max-tokens-per-job", type=click.IntRange(min=1), default=None,
              help="The largest max_tokens a job may ask for.")
def tenants_set_limits(tenant: str, **limits: int | None) -> None:
    """Set TENANT's admission limits.

    An option left out is unlimited; 0 (where allowed) blocks."""
    from genq import db
    from genq.limits import TenantLimits, limits_of, set_limits

    url = existing_database_url(get_settings())
    try:
        with db.transaction(url) as session:
            saved = limits_of(set_limits(session, tenant, TenantLimits(**limits)))
    except LookupError as exc:
        raise CommandFailed("not_found", str(exc)) from None
    click.echo(json.dumps({"tenant": tenant, **asdict(saved)}, indent=2))


@click.command()
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
def prune(dry_run: bool) -> None:
    """Delete old finished work (GENQ_RETENTION_* say how old)."""
    from genq.retention import prune as prune_rows

    settings = get_settings()
    existing_database_url(settings)
    report = prune_rows(settings, dry_run=dry_run)
    click.echo(f"{'would delete' if dry_run else 'deleted'}: {report}")
