"""Credentials out of what qtasks shows: one rule for logs, errors, the CLI and the dashboard.

A URL keeps its scheme, user name, host, port and path; its password (or its whole user
information when that has no ``:``, a key such as Sentry's DSN holds), and the value of every
query parameter named like a secret (``?password=``, ``?token=``), become :data:`MASK`. A value
whose key is named like a secret (:func:`is_secret_key`: ``password``, ``token``,
``api_key``, ``auth``..., but not ``auth_mechanism`` or ``author``) is masked whole.
"""

from __future__ import annotations

import inspect
import re
import traceback
from bisect import bisect_right
from itertools import groupby
from typing import Any, overload
from urllib.parse import unquote_plus, urlsplit

MASK = "***"

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
"""The words of a name: ``db_password``, ``authMechanism``, ``X-Api-Key``, ``APIKey``."""

SECRET_NOUN = re.compile(
    r"pass|pwd|secret|credential|token|auth|cookie|session|signature|bearer"
    r"|apikey|accesskey|privatekey|signingkey|encryptionkey|masterkey|hmackey"
)
"""What makes a name a secret wherever it stands in it, words run together and lowercase:
``dbpass``, ``pass_phrase``, ``auth_key``, ``X-Auth-Key``, ``api_keys``, ``tokens``,
``private_key_pem``, ``session_cookies`` (a search, so plurals and compounds count too)."""

PLAIN_WORDS = frozenset(
    {
        "author", "authors", "authored", "authoring", "authorship", "authority",
        "authorities", "tokenizer", "tokenizers", "passive", "passthrough", "passthru",
        "passage", "passages", "passenger", "passengers", "passing", "passed", "passes",
        "bypass", "compass", "encompass", "surpass", "impasse",
    }
)  # fmt: skip
"""Words that contain a secret noun without naming a secret (``author``, ``bypass``). They
hold no noun and are never run together with their neighbours: ``author_email`` is shown,
``author_token`` masked."""

PLAIN_NAMES = frozenset(
    {"maxtokens", "maxnewtokens", "maxinputtokens", "maxoutputtokens", "maxcompletiontokens"}
)
"""Whole names (words run together, lowercase) that count tokens (``max_tokens``)."""

PLAIN_SUFFIXES = frozenset(
    {
        "mechanism", "mechanisms", "url", "urls", "uri", "uris", "endpoint", "endpoints",
        "type", "types", "timeout", "ttl", "age", "expiry", "expires", "expiration",
        "lifetime", "interval", "path", "file", "filename", "dir", "directory", "name",
        "names", "source", "method", "methods", "version", "scope", "scopes", "enabled",
        "disabled", "required", "len", "length", "count", "size", "max", "min", "limit",
        "error", "errors", "exception", "warning",
    }
)  # fmt: skip
"""Last words by which a secret-looking name describes the secret instead of holding it:
``auth_mechanism``, ``token_url``, ``session_timeout``, ``cookie_name``, ``password_file``;
and an exception's class, whose message follows it in a traceback or an error line
(``NoCredentialsError: Unable to locate credentials``, ``ExpiredSignatureError: ...``)."""


def is_secret_key(name: str) -> bool:
    """Whether a value stored under ``name`` (a setting, a query parameter, an argument) is
    treated as a secret: one rule for everything qtasks shows, and it fails safe.

    A name is a secret when its words, run together, contain a :data:`SECRET_NOUN`
    (``password``, ``dbpass``, ``auth_key``, ``api_keys``, ``tokens``, ``private_key_pem``...),
    unless its last word is one of :data:`PLAIN_SUFFIXES` (``auth_mechanism``, ``token_url``,
    ``session_timeout``) or it is one of :data:`PLAIN_NAMES` (``max_tokens``);
    :data:`PLAIN_WORDS` (``author``, ``bypass``) hold no noun. Every other name with a secret
    noun in it is masked: hiding a plain value is a nuisance, showing a secret is a leak."""
    words = [word.lower() for word in _WORD.findall(name) if not word.isdigit()]
    if not words or words[-1] in PLAIN_SUFFIXES or "".join(words) in PLAIN_NAMES:
        return False
    # Plain words split the name, so "author" + "key" never reads as "...auth...key".
    return any(
        not plain and SECRET_NOUN.search("".join(run))
        for plain, run in groupby(words, PLAIN_WORDS.__contains__)
    )


@overload
def mask_url(url: str) -> str: ...
@overload
def mask_url(url: None) -> None: ...
def mask_url(url: str | None) -> str | None:
    """``url`` with its password and secret query values replaced by :data:`MASK`.

    User information with no ``:`` is masked whole: it is a key (Sentry's
    ``https://<key>@o1.ingest.sentry.io/42``, ``redis://<token>@host``), and a user name
    cannot be told from one. The user information ends at the *last* ``@`` of the
    authority, as redis-py and ``urllib`` read it, so a password containing ``@`` is masked
    whole. A URL whose credentials cannot be located (an ``@`` after the authority, as an
    unencoded ``/`` or ``?`` in a password leaves) keeps only its scheme; one that does not
    parse is masked whole."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    query = "&".join(_mask_param(param) for param in parts.query.split("&"))
    if "@" in parts.path + query + parts.fragment:
        return f"{parts.scheme}://{MASK}" if parts.scheme else MASK
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    elif userinfo:
        netloc = f"{MASK}@{host}"
    if netloc == parts.netloc and query == parts.query:
        return url
    rebuilt = f"{parts.scheme}:" if parts.scheme else ""
    if netloc or url[len(rebuilt) :].startswith("//"):
        rebuilt += f"//{netloc}"
    rebuilt += parts.path
    if query:
        rebuilt += f"?{query}"
    if parts.fragment:
        rebuilt += f"#{parts.fragment}"
    return rebuilt


def _mask_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={MASK}" if eq and is_secret_key(unquote_plus(name)) else param


# Both start only where a run of their characters starts, and never backtrack into it, so a
# long run (a 100 kB token, "a-a-a-...") is read once, not once per character of it.
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z0-9+.-]++://\S+")
_NAME_IN_TEXT = re.compile(r"(?<![\w-])([A-Za-z_-][\w-]*+)['\"]?[ \t]*[=:][ \t]*")
_STRING = r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\""
"""A quoted string on one line, backslash escapes included. When the string of a quote does
not close on its line, neither does that of any later quote of its kind on that line (its
closing quote would have closed the first string): what is read once is not read again."""
_STRING_LINE = re.compile(r"[^\n]*?(?=\r?\n|\Z)")
"""The rest of a string's line (a lone ``\\r`` does not end it)."""
_STRING_AT = re.compile(_STRING)
_QUOTED_VALUE = re.compile(rf"([bBrRuU]{{0,2}})({_STRING})")
_GROUP_PART = re.compile(r"['\"()\[\]{}]")
_SCHEME_VALUE = re.compile(
    r"(?:Bearer|Basic|Token|Digest|Negotiate|NTLM|OAuth|AWS4-HMAC-SHA256)[ \t]+\S", re.IGNORECASE
)
_UNQUOTED_VALUE = re.compile(rf"(?:[^,;\r\n'\"]+|{_STRING})*")
_LINE = re.compile(r"[^\r\n]*")
_BEARER = re.compile(r"\b(Bearer[ \t]+)[\w.~+/-]+=*", re.IGNORECASE)


def mask_text(text: str) -> str:
    """Free ``text`` (an exception's message, a log line) as it may be shown: every URL in it
    through :func:`mask_url`, the credential after every ``Bearer``, and the whole value of
    every ``name=value`` or ``name: value`` whose name is a secret (:func:`is_secret_key`)
    replaced by :data:`MASK`.

    A value is a quoted string (``'...'``, ``b"..."``) up to its closing quote; a
    ``(``/``[``/``{`` literal up to its closing bracket (``auth=('user', 'pw')``); an
    authorization scheme and what follows it, to the end of the line (``Authorization:
    Basic ...``, ``Digest username="u", response="..."``); otherwise everything up to the
    next ``,`` or ``;`` outside quotes or the end of the line. A value whose end cannot be
    found (an unclosed quote or bracket) is masked to the end of its line (bracket: of the
    text). A URL runs to the next whitespace, so a password with a space in it is not found
    whole; the rest of a message that quotes a URL (``...@host')``) is kept."""
    text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group()), text)
    # A URL's query is masked already: a name in it is not the start of a value.
    urls = [m.span() for m in _URL_IN_TEXT.finditer(text)]
    shown: list[str] = []
    done = 0
    for name in _NAME_IN_TEXT.finditer(text):
        url = bisect_right(urls, (name.start(), len(text))) - 1
        if name.start() < done or (url >= 0 and name.start() < urls[url][1]):
            continue
        if not is_secret_key(name.group(1)):
            continue
        end, mask = _value(text, name.end())
        if end > name.end():
            shown += [text[done : name.end()], mask]
            done = end
    return _BEARER.sub(rf"\g<1>{MASK}", "".join(shown) + text[done:])


def _value(text: str, start: int) -> tuple[int, str]:
    """Where the value at ``text[start]`` ends, and what is shown instead of it."""
    quoted = _QUOTED_VALUE.match(text, start)
    if quoted:
        prefix, string = quoted.groups()
        return quoted.end(), f"{prefix}{string[0]}{MASK}{string[0]}"
    # The end of the line is looked for only when the value runs to it: done once per line,
    # not once per name on it (a line of "password=;" repeated would take quadratic time).
    if text.startswith(("(", "[", "{"), start):
        return _group_end(text, start), MASK
    if _SCHEME_VALUE.match(text, start):
        return _end(_LINE, text, start), MASK
    end = _end(_UNQUOTED_VALUE, text, start)
    if end < len(text) and text[end] in "'\"":  # an unclosed quote: where it ends is unknowable
        return _end(_STRING_LINE, text, end), MASK
    return start + len(text[start:end].rstrip()), MASK


def _group_end(text: str, start: int) -> int:
    """Where the bracket at ``text[start]`` is closed, strings skipped (the end of ``text``
    when it is not)."""
    depth = 0
    unclosed = {"'": start, '"': start}  # per quote: where its strings may close again
    at = start
    while part := _GROUP_PART.search(text, at):
        char, at = part.group(), part.end()
        if char in "'\"":
            if part.start() < unclosed[char]:
                continue
            string = _STRING_AT.match(text, part.start())
            if string:
                at = string.end()
            else:  # an unclosed quote counts for nothing, and neither do the next on its line
                unclosed[char] = _end(_STRING_LINE, text, at)
            continue
        depth += 1 if char in "([{" else -1
        if depth == 0:
            return at
    return len(text)


def _end(pattern: re.Pattern[str], text: str, start: int) -> int:
    """Where ``pattern`` (one that may match nothing) stops matching from ``start``."""
    match = pattern.match(text, start)
    return start if match is None else match.end()


SECRET_TABLES = frozenset({"users"})
"""Keys of tables whose every value is a credential under a non-secret name (qtasks-web's
``users``: name = password)."""


def masked(value: Any) -> Any:
    """A setting's ``value`` (tables, lists, strings) as it may be shown.

    The value of a key named like a secret, and every value of a :data:`SECRET_TABLES`
    table, becomes :data:`MASK`, except a reference to an environment variable
    (``"env:NAME"``), which names the secret without holding it; every other string goes
    through :func:`mask_url`. Bytes (a value of the wrong type, quoted in an error) are
    masked as the string they hold and stay bytes."""
    if isinstance(value, dict):
        return {key: masked_entry(key, sub) for key, sub in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, bytes | bytearray):
        # latin-1 gives every byte a character and back, so what is not masked is kept as is.
        return type(value)(mask_url(value.decode("latin-1")).encode("latin-1"))
    return value


def masked_entry(key: Any, value: Any) -> Any:
    """``value`` as :func:`masked` shows it under ``key`` (a setting's name, a table's key):
    :data:`MASK` when ``key`` is named like a secret (a ``str`` or ``bytes`` name)."""
    if key in SECRET_TABLES and isinstance(value, dict):
        return {name: _hidden(item) for name, item in value.items()}
    name = key.decode("latin-1") if isinstance(key, bytes | bytearray) else key
    if isinstance(name, str) and is_secret_key(name):
        return _hidden(value)
    return masked(value)


def _hidden(value: Any) -> Any:
    return value if isinstance(value, str) and value.startswith("env:") else MASK


MAX_DEPTH = 20
"""How deep :func:`masked_value` looks into nested data; what is deeper is masked whole."""


def masked_value(value: Any, mask: str = MASK, depth: int = 0) -> Any:
    """Data a task was given or returned (arguments, a result, message headers) as it may be
    shown: the value of every key named like a secret (:func:`is_secret_key`) becomes
    ``mask``, at any depth, and every string goes through :func:`mask_text` (a URL's
    password, ``token=...`` in a text); what is nested too deep to check (past
    :data:`MAX_DEPTH` levels) is replaced whole. Sets and tuples come back as lists.

    One rule for the dashboard (whose ``mask`` is its own mark) and the CLI's task records."""
    if depth > MAX_DEPTH:
        return mask
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {
            k: mask if isinstance(k, str) and is_secret_key(k) else masked_value(v, mask, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [masked_value(v, mask, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):  # latin-1: every byte a character and back
        return bytes(mask_text(value.decode("latin-1")).encode("latin-1"))
    return value


def masked_args(
    args: list[Any], signature: inspect.Signature | None, mask: str = MASK
) -> list[Any]:
    """Positional ``args`` through :func:`masked_value`, and each masked whole when the
    parameter it binds to in ``signature`` (the task's, ``None`` when unknown) is named like
    a secret (``send(user, password)``)."""
    shown: list[Any] = masked_value(args, mask)
    if signature is None:
        return shown
    names = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [
        mask if i < len(names) and is_secret_key(names[i]) else value
        for i, value in enumerate(shown)
    ]


def text_of(exc: BaseException) -> str:
    """``str(exc)``, or what :mod:`traceback` writes for an exception whose ``__str__``
    raises (``<exception str() failed>``): an error is shown and recorded whatever it is."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def masked_error(exc: BaseException) -> str:
    """An exception as qtasks shows one it did not raise itself (a plugin's, a component's):
    its type and its text through :func:`mask_text` (a failed call often quotes the DSN it
    could not reach)."""
    text = mask_text(text_of(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def masked_traceback(exc: BaseException) -> str:
    """``exc``'s traceback (its causes included) as Python prints it, through
    :func:`mask_text`: for a log line, instead of ``exc_info``, which hands the raw
    exception, text and all, to every handler (a file, Sentry)."""
    return mask_text("".join(traceback.format_exception(exc)))
