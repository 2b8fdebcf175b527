"""Store URLs without their secrets: every log line and message about a store goes through `redacted`.

Operations:
  redacted(url)            the URL with its password (userinfo and ?password=) replaced by ***
  scrub(text, url)         `text` (an exception message) with the URL's password removed wherever it appears
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"


def _password(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        pw = parts.password
    except ValueError:
        pw = None
        parts = None
    if pw:
        return unquote(pw)
    if parts is not None:
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k.lower() == "password" and v:
                return v
    return None


def redacted(url: str | None) -> str:
    """`url` with any password masked: redis://user:***@host:6379/0. Never raises."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else (f"{MASK}@{host}" if user and not parts.scheme.startswith("file") else netloc)
            # a lone userinfo is masked too: people write redis://secret@host meaning a password
        query = parts.query
        if query:
            pairs = [(k, MASK if k.lower() == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
            query = urlencode(pairs, safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        # unparseable: keep the scheme and mask everything between :// and the last @
        return re.sub(r"(://)[^/]*@", r"\1" + MASK + "@", url)


def scrub(text: str, url: str | None) -> str:
    """`text` with the password of `url` (raw and percent-decoded) replaced by ***."""
    if not url:
        return text
    pw = _password(url)
    raw = None
    try:
        raw = urlsplit(url).netloc.rsplit("@", 1)[0].split(":", 1)[-1] if "@" in urlsplit(url).netloc else None
    except ValueError:
        pass
    for secret in {pw, raw} - {None, ""}:
        text = text.replace(secret, MASK)
    return text.replace(url, redacted(url))
