"""Standard Webhooks signatures (https://www.standardwebhooks.com): what a receiver verifies.

A secret is `whsec_` + base64 of random bytes; the signature of one delivery is
`v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">` keyed with the decoded bytes.
During a secret rotation the delivery carries one signature per valid secret, space-separated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as random
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random.token_bytes(SECRET_BYTES)).decode()


def is_secret(text: str) -> bool:
    if not text.startswith(SECRET_PREFIX):
        return False
    try:
        return len(base64.b64decode(text.removeprefix(SECRET_PREFIX), validate=True)) >= 24
    except ValueError:
        return False


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Iterable[str], message_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets)
