"""The one masking rule (:mod:`qtasks.masking`): secrets hidden, plain settings shown."""

from __future__ import annotations

import pytest

from qtasks.masking import MASK, is_secret_key, masked

SECRET_KEYS = [
    "password",
    "PASSWORD",
    "db_password",
    "sasl_plain_password",
    "sslpassword",
    "passwd",
    "pwd",
    "pass",
    "redis_pass",
    "passphrase",
    "password2",
    "secret",
    "client_secret",
    "secret_key",
    "aws_secret_access_key",
    "token",
    "auth_token",
    "authToken",
    "access_token",
    "refresh_token",
    "csrftoken",
    "bearerToken",
    "token_value",
    "api_key",
    "apikey",
    "api-key",
    "X-Api-Key",
    "APIKey",
    "access_key",
    "access_key_id",
    "private_key",
    "privateKey",
    "signing_key",
    "credentials",
    "credential",
    "cookie",
    "session_cookie",
    "session",
    "session_id",
    "sessionid",
    "signature",
    "auth",
    "http_auth",
    "basic_auth",
    "Authorization",
    "proxy_authorization",
    "bearer",
]

PLAIN_KEYS = [
    "auth_mechanism",
    "authMechanism",
    "auth_source",
    "authSource",
    "auth_method",
    "auth_type",
    "author",
    "authors",
    "author_name",
    "authority",
    "passive",
    "bypass_cache",
    "passthrough",
    "session_timeout",
    "session_idle_timeout",
    "private",
    "max_tokens",
    "tokenizer",
    "token_type",
    "token_url",
    "cookie_name",
    "signature_version",
    "api_key_header",
    "host",
    "user",
    "username",
    "broker_url",
    "keyspace",
    "compass",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_masked(key: str) -> None:
    assert is_secret_key(key)
    assert masked({key: "hunter2"}) == {key: MASK}


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys_are_shown(key: str) -> None:
    """``auth_mechanism=PLAIN`` says how to log in, not with what: it stays readable."""
    assert not is_secret_key(key)
    assert masked({key: "PLAIN"}) == {key: "PLAIN"}


def test_the_same_rule_masks_query_parameters() -> None:
    from qtasks.masking import mask_url

    url = "amqp://u:pw@h/?auth_mechanism=PLAIN&auth=s3cret&api_key=k"
    assert mask_url(url) == "amqp://u:***@h/?auth_mechanism=PLAIN&auth=***&api_key=***"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "RuntimeError('cannot connect to redis://user:secret@host')",
            "RuntimeError('cannot connect to redis://user:***@host')",
        ),
        (
            "Error 111 connecting to redis://:pw@10.0.0.1:6379/0?password=pw&db=1. Refused.",
            "Error 111 connecting to redis://:***@10.0.0.1:6379/0?password=***&db=1. Refused.",
        ),
        (
            "ValueError({'password': 'hunter2', 'auth_mechanism': 'PLAIN'})",
            "ValueError({'password': '***', 'auth_mechanism': 'PLAIN'})",
        ),
        ("AUTH failed: password: hunter2", "AUTH failed: password: ***"),
        ("token=abc; host=h:6379", "token=***; host=h:6379"),
        ("see https://docs.example/x?y=1 for more", "see https://docs.example/x?y=1 for more"),
    ],
)
def test_free_text_goes_through_the_same_rule(text: str, shown: str) -> None:
    from qtasks.masking import mask_text

    assert mask_text(text) == shown
