"""API keys: created once and shown once; only their sha256 and a visible prefix are stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "gq_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant_name: str) -> str:
    """Create the tenant if needed, add a key for it, and return the key in clear (only here)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    return key


def tenant_id_for_key(session: Session, key: str) -> str | None:
    return session.scalar(
        select(ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    )


def list_api_keys(session: Session, tenant_name: str) -> list[dict] | None:
    """The tenant's keys (never their hash), oldest first; None if there is no such tenant."""
    tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
    if tenant_id is None:
        return None
    found = session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at))
    return [_describe(key) for key in found]


def revoke_api_key(session: Session, key_id: str) -> dict | None:
    """Set the key's revoked_at (once: revoking again keeps the first time); None if unknown."""
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return _describe(key)


def _describe(key: ApiKey) -> dict:
    return {"id": key.id, "prefix": key.prefix, "created_at": key.created_at,
            "revoked_at": key.revoked_at}


def active_key(session: Session, key: str) -> ApiKey | None:
    """The key's row (id and tenant), None when unknown or revoked."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                               ApiKey.revoked_at.is_(None)))


def is_key_active(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    return key is not None and key.revoked_at is None
