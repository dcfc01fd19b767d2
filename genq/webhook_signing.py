"""Standard Webhooks v1 signing (https://www.standardwebhooks.com), with the official package:
`webhook-id`, `webhook-timestamp` and one `v1,<base64 HMAC-SHA256>` per active secret."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signed_headers(message_id: str, timestamp: datetime, body: str,
                   active_secrets: list[str]) -> dict[str, str]:
    """The three Standard Webhooks headers. During a rotation grace period `active_secrets`
    holds the new and the old secret, and the signature header carries both, space-separated."""
    signatures = [Webhook(secret).sign(message_id, timestamp, body) for secret in active_secrets]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
