"""The one masking rule (:mod:`qtasks.masking`): secrets hidden, plain settings shown."""

from __future__ import annotations

import time

import pytest

from qtasks.masking import MASK, is_secret_key, mask_text, masked

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
    # Fail safe: a secret noun anywhere, with a suffix that is not a known plain one.
    "auth_key",
    "AUTH_KEY",
    "authkey",
    "X-Auth-Key",
    "api_keys",
    "apiKeys",
    "access_keys",
    "tokens",
    "auth_tokens",
    "api_tokens",
    "refresh_tokens",
    "auth_header",
    "authorization_header",
    "api_key_header",  # like auth_header: it may hold the header's value
    "private_key_pem",
    "private_key_content",
    "private_keys",
    "signature_key",
    "signing_keys",
    "dbpass",
    "redispass",
    "adminpass",
    "DBPASS",
    "passcode",
    "passkey",
    "pass_phrase",
    "authentication",
    "cookies",
    "session_cookies",
    "token_json",
    "token_bytes",
    "access_token_encrypted",
    "auth_secret",
    "password_hash",
    "master_key",
    "oauth2_client_token",
    "author_token",  # a plain word does not hide a secret noun beside it
    "bypass_token",
    "max_tokens_secret",
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
    "host",
    "user",
    "username",
    "broker_url",
    "keyspace",
    "compass",
    "author_email",
    "max_new_tokens",
    "cookie_max_age",
    "session_expires",
    "auth_header_name",
    "password_file",
    "private_key_path",
    "credentials_file",
    "secret_name",
    "token_ttl",
    "password_min_length",
    "auth_enabled",
    "password_required",
    "AuthenticationError",  # an exception's class: its message follows it, not a secret
    "NoCredentialsError",
    "ExpiredSignatureError",
    "InvalidTokenException",
    "token_errors",
    "",
    "123",
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
    url = "https://api.example.com/v1?auth_key=s3cr3t&api_keys=k1&passcode=1234&token_type=x"
    shown = "https://api.example.com/v1?auth_key=***&api_keys=***&passcode=***&token_type=x"
    assert mask_url(url) == shown


def test_a_key_in_a_settings_url_is_masked() -> None:
    """A DSN under a plain name (``dsn``, ``broker_url``) hides the key its user part holds."""
    extra = {
        "sentry": {"dsn": "https://0a1b2c3d@o123.ingest.sentry.io/42"},
        "urls": ["redis://token@host", "redis://u:pw@host"],
    }
    assert masked(extra) == {
        "sentry": {"dsn": "https://***@o123.ingest.sentry.io/42"},
        "urls": ["redis://***@host", "redis://u:***@host"],
    }


def test_a_secret_table_or_list_is_masked_whole() -> None:
    """``qtasks config``'s ``extra``: the value under a secret name goes, whatever its shape."""
    extra = {
        "sentry": {"auth_key": "s3cr3t", "host": "h"},
        "api_keys": ["k1", "k2"],
        "tokens": {"alice": "t0k"},
        "dbpass": "hunter2",
        "private_key_pem": "-----BEGIN PRIVATE KEY-----MIIE",
    }
    assert masked(extra) == {
        "sentry": {"auth_key": MASK, "host": "h"},
        "api_keys": MASK,
        "tokens": MASK,
        "dbpass": MASK,
        "private_key_pem": MASK,
    }


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
        # An exception's class is not a secret's name: its message is shown (masked itself).
        (
            "botocore.exceptions.NoCredentialsError: Unable to locate credentials",
            "botocore.exceptions.NoCredentialsError: Unable to locate credentials",
        ),
        (
            "AuthenticationError: bad login, password=hunter2",
            "AuthenticationError: bad login, password=***",
        ),
        ("token=abc; host=h:6379", "token=***; host=h:6379"),
        ("see https://docs.example/x?y=1 for more", "see https://docs.example/x?y=1 for more"),
        # A value is masked whole, whatever its shape.
        ("Authorization: Bearer eyJhbGciOi.payload.sig rejected", "Authorization: ***"),
        (
            "headers={'Authorization': 'Basic dXNlcjpodW50ZXIy', 'Accept': 'text/plain'}",
            "headers={'Authorization': '***', 'Accept': 'text/plain'}",
        ),
        (
            'Authorization: Digest username="u", response="6629fae4"\nretrying',
            "Authorization: ***\nretrying",
        ),
        ("password='correct horse battery staple'", "password='***'"),
        ('password="it\\"s, a secret", user=u', 'password="***", user=u'),
        ("password=abc def, user=u; token=xyz", "password=***, user=u; token=***"),
        ("password=abc,def;ghi", "password=***,def;ghi"),
        ("password=a'b,c'd, user=u", "password=***, user=u"),
        ("password=it's unknown, user=u", "password=***"),  # an unclosed quote: the whole line
        ("password='x\ry, user=u\r\nhost: h", "password=***\r\nhost: h"),  # a lone \r: same line
        ("{'password': b'hunter2', 'db': 0}", "{'password': b'***', 'db': 0}"),
        ("auth=('user', 'hunter2'), timeout=3", "auth=***, timeout=3"),
        ("{'api_keys': ['k1', 'k2'], 'host': 'h'}", "{'api_keys': ***, 'host': 'h'}"),
        ("kwargs={'tokens': {'alice': 'x,y'}}, retry", "kwargs={'tokens': ***}, retry"),
        ("X-Auth-Key: cf-global-key\nHost: api", "X-Auth-Key: ***\nHost: api"),
        ("password: hunter2\nhost: h", "password: ***\nhost: h"),
        ("sent Bearer abc.def-ghi= to the API", "sent Bearer *** to the API"),
        (
            "cannot reach amqp://audit:hunter2@mq:5672/ (password=hunter2)",
            "cannot reach amqp://audit:***@mq:5672/ (password=***",
        ),
        ("auth_mechanism=PLAIN, password=", "auth_mechanism=PLAIN, password="),
        ("run --password=hunter2", "run --password=***"),
        ("via broker-redis://u:pw@h/0, retrying", "via broker-redis://u:***@h/0, retrying"),
        ("X-Auth-Key=k", "X-Auth-Key=***"),
        # A URL's user information without ":" is a key: masked whole.
        (
            "sentry: cannot send to https://0a1b2c3d@o123.ingest.sentry.io/42, dropped",
            "sentry: cannot send to https://***@o123.ingest.sentry.io/42, dropped",
        ),
        (
            "ConnectionError('Error 111 connecting to redis://token@host:6379.')",
            "ConnectionError('Error 111 connecting to redis://***@host:6379.')",
        ),
    ],
)
def test_free_text_goes_through_the_same_rule(text: str, shown: str) -> None:
    from qtasks.masking import mask_text

    assert mask_text(text) == shown


def _repeated(unit: str, prefix: str = "", size: int = 100_000) -> str:
    return prefix + unit * (size // len(unit))


@pytest.mark.parametrize(
    "text",
    [
        _repeated('"'),
        _repeated("'\""),
        _repeated('a="b '),
        _repeated("password=;"),  # every value empty: each name looked for its line's end
        _repeated('password=x,"'),
        _repeated('password=,"\\'),
        _repeated("password=x\\'\r"),  # an unclosed string runs past the \r the line ends at
        _repeated('"\\', prefix="token=["),  # a bracket never closed, its quotes never either
        _repeated("'\\", prefix="auth=("),
        _repeated('{"a\\', prefix="tokens="),
        _repeated("Authorization: Bearer "),
    ],
    ids=lambda text: repr(text[:14]),
)
def test_mask_text_takes_linear_time(text: str) -> None:
    """An error's text may be long and unpaired quotes are common in it: 100k characters are
    read in a few milliseconds (quadratic was seconds), well within the deadline."""
    started = time.process_time()  # CPU time: other processes on the machine do not count
    mask_text(text)
    assert time.process_time() - started < 0.5
