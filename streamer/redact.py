"""Secrets out of text that vigil shows: URLs in logs, status fields and retained topics.

Camera and Redis URLs often carry credentials (``rtsp://admin:pw@cam``, ``rtsp://token@cam``,
``redis://:pw@host``) and tokens in the query string (``?token=…``, ``&key=…``). ``redact_url``
is the one place that removes them; ``redact_text`` applies it to every URL inside a longer text
(an error message, a formatted log line).

Both are plain string surgery that never raises: ``urllib.parse.urlsplit`` raises ``ValueError`` on
a malformed IPv6 host (``rtsp://u:p@[::1/x``), and an exception here would print the URL it was
meant to hide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# scheme://authority rest: RFC 3986's scheme characters; the authority ends at the first / ? or #.
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)", re.DOTALL)
# A URL inside running text ends at whitespace or a quote (log lines quote paths: 'rtsp://…').
_URL_IN_TEXT_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")


def redact_url(url: str) -> str:
    """``url`` without user info, query values or fragment; anything that is not ``scheme://…`` as is.

    ``rtsp://admin:pw@[::1]:554/x?token=t#f`` → ``rtsp://***@[::1]:554/x?token=***#***``. The host,
    port and path are kept (they say which camera it is); query keys are kept, values are not.
    """
    match = _URL_RE.fullmatch(url)
    if match is None:
        return url  # a file path, /dev/videoN, lavfi:GRAPH: nothing secret in the URL sense
    scheme, authority, rest = match.groups()
    if "@" in authority:
        # rpartition: a password may itself contain '@' (unescaped, as users write them).
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    rest, hash_mark, fragment = rest.partition("#")
    path, question_mark, query = rest.partition("?")
    if query:
        query = "&".join(_redact_param(param) for param in query.split("&"))
    return f"{scheme}{authority}{path}{question_mark}{query}{hash_mark}{MASK if fragment else ''}"


def _redact_param(param: str) -> str:
    key, equals, value = param.partition("=")
    if not equals:
        return MASK if key else key  # '?secret' alone: the whole parameter may be the token
    return f"{key}={MASK if value else ''}"


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL in it redacted and each of ``secrets`` (non-empty) replaced by the mask."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return _URL_IN_TEXT_RE.sub(lambda m: redact_url(m.group(0)), text)
