"""Standard Webhooks signing: the spec's published test vector, the receiver-side
check, secrets, and interoperability with the openai SDK's verifier."""

from __future__ import annotations

import base64

import pytest
from openai import InvalidWebhookSignatureError, OpenAI

from overnight.webhooks.signing import (
    WebhookSecretError,
    WebhookVerificationError,
    generate_secret,
    parse_secret,
    parse_secrets,
    sign,
    signed_headers,
    verify,
)

# The Standard Webhooks reference libraries' test vector (libraries/*/tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def vector_headers(signature: str = VECTOR_SIGNATURE) -> dict[str, str]:
    return {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": signature}


def test_the_specs_test_vector_signs_exactly() -> None:
    assert sign([parse_secret(VECTOR_SECRET)], VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE


def test_verify_accepts_the_test_vector_within_the_tolerance_only() -> None:
    verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS + 300)
    verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS - 300)
    with pytest.raises(WebhookVerificationError, match="300 s"):
        verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS + 301)
    with pytest.raises(WebhookVerificationError, match="300 s"):
        verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS - 301)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda h, b: (h, b + b" "), "no signature matches"),
        (lambda h, b: ({**h, "webhook-id": "msg_other"}, b), "no signature matches"),
        (lambda h, b: ({**h, "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="}, b),
         "no signature matches"),
        (lambda h, b: ({**h, "webhook-signature": "v2," + VECTOR_SIGNATURE[3:]}, b), "no signature matches"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "webhook-signature"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "webhook-id"),
        (lambda h, b: ({**h, "webhook-timestamp": "hello"}, b), "integer"),
        (lambda h, b: ({**h, "webhook-timestamp": "1614265330.5"}, b), "integer"),
    ],
)
def test_verify_refuses_what_does_not_check_out(change, why) -> None:  # type: ignore[no-untyped-def]
    headers, body = change(vector_headers(), VECTOR_BODY)
    with pytest.raises(WebhookVerificationError, match=why):
        verify(VECTOR_SECRET, headers, body, now=VECTOR_TS)


def test_verify_refuses_another_secret() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), vector_headers(), VECTOR_BODY, now=VECTOR_TS)


def test_one_matching_signature_among_several_is_enough_and_header_case_does_not_matter() -> None:
    # As the spec's multi-signature case: other versions and stale keys around the good one.
    sigs = ["v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=", "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            VECTOR_SIGNATURE, "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="]
    headers = {k.title(): v for k, v in vector_headers(" ".join(sigs)).items()}
    verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TS)


def test_rotating_secrets_sign_with_every_key_so_either_verifies() -> None:
    new, old = generate_secret(), generate_secret()
    keys = parse_secrets(f"{new}, {old}")
    headers = signed_headers(keys, "evt_1", b"{}", timestamp=VECTOR_TS)
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (new, old):
        verify(secret, headers, b"{}", now=VECTOR_TS)
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), headers, b"{}", now=VECTOR_TS)


def test_the_openai_sdk_verifies_what_overnight_signs() -> None:
    secret = generate_secret()
    body = b'{"object":"event","id":"evt_1","type":"batch.completed","created_at":1,"data":{"id":"batch_1"}}'
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    headers = signed_headers(parse_secrets(secret), "evt_1", body)
    client.webhooks.verify_signature(body, headers, secret=secret)
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("batch.completed", "batch_1")
    with pytest.raises(InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body, headers, secret=generate_secret())


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
        ("whsec_not*base64!", "base64"),
        ("whsec_" + base64.b64encode(b"x" * 16).decode(), "16 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
        (42, "whsec_"),
    ],
)
def test_a_malformed_secret_is_refused_without_echoing_it(value, why) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WebhookSecretError, match=why) as err:
        parse_secret(value)
    if isinstance(value, str):
        assert value.removeprefix("whsec_") not in str(err.value)


def test_secret_bounds_and_generation() -> None:
    assert len(parse_secret("whsec_" + base64.b64encode(b"k" * 24).decode())) == 24
    assert len(parse_secret("whsec_" + base64.b64encode(b"k" * 64).decode())) == 64
    assert len(parse_secret(generate_secret())) == 32
    assert generate_secret() != generate_secret()
    with pytest.raises(WebhookSecretError, match="secret #2"):
        parse_secrets(f"{generate_secret()},whsec_short")


def test_an_id_with_a_dot_is_never_signed() -> None:
    with pytest.raises(ValueError, match="'.'"):
        sign(parse_secrets(generate_secret()), "evt.1", 1, b"{}")
