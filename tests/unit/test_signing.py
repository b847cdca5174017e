"""Standard Webhooks signatures (dreamq/signing.py), checked with the reference verifier."""

from __future__ import annotations

import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from dreamq.signing import is_secret, new_secret, sign, signature_header

BODY = b'{"status":"success","id":7,"track_id":"order-1"}'


def headers(secrets: list[str], body: bytes = BODY) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "webhook-id": "msg_7_success",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, "msg_7_success", timestamp, body),
    }


def test_a_new_secret_is_whsec_base64_of_32_random_bytes() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_") and is_secret(first)
    assert first != second
    assert not is_secret("whsec_c2hvcnQ=")  # 5 bytes
    assert not is_secret("nothing")


def test_the_reference_verifier_accepts_the_signature() -> None:
    secret = new_secret()
    assert Webhook(secret).verify(BODY, headers([secret])) == {
        "status": "success",
        "id": 7,
        "track_id": "order-1",
    }


def test_a_flipped_byte_fails_verification() -> None:
    secret = new_secret()
    signed = headers([secret])
    tampered = bytearray(BODY)
    tampered[3] ^= 0x01
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(bytes(tampered), signed)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, signed)


def test_during_rotation_both_secrets_verify() -> None:
    old, new = new_secret(), new_secret()
    signed = headers([new, old])
    assert len(signed["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, signed)


def test_known_vector() -> None:
    # The example of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
