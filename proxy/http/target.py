"""The request target's four forms (RFC 9112 3.2), told apart once, when the head is parsed.

Which forms are served is a separate decision (``front.admit_target``):
a reverse proxy serves origin-form (``GET /path``); a forward proxy would also
serve absolute-form (``GET http://host/path``) and CONNECT's authority-form
(``CONNECT host:443``). ``OPTIONS *`` is asterisk-form. A target that fits no
form, or a form its method does not take (``CONNECT /x``, ``GET host:443``,
``GET *``), has no form at all.
"""

from __future__ import annotations

import re

ORIGIN, ABSOLUTE, AUTHORITY, ASTERISK = "origin", "absolute", "authority", "asterisk"

# scheme "://" authority, then the path and query (a fragment, which clients should not send, is dropped).
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*+)://([^/?#]*+)([^#]*+)(?:#.*)?", re.DOTALL)
# host ":" port, the host a name, an IPv4 address or a bracketed IPv6 literal.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9._~!$&'()*+,;=%\-]++):([0-9]{1,5})")


def target_form(method: str, target: str) -> str | None:
    """ORIGIN, ABSOLUTE, AUTHORITY or ASTERISK; None for a target that fits no form its method takes."""
    if method == "CONNECT":
        return AUTHORITY if _AUTHORITY.fullmatch(target) else None
    if target.startswith("/"):
        return ORIGIN
    if target == "*":
        return ASTERISK if method == "OPTIONS" else None
    return ABSOLUTE if _ABSOLUTE.fullmatch(target) else None


def split_absolute(target: str) -> tuple[str, str, str]:
    """The scheme (lower-cased), authority and origin-form (path and query, or "/") of an absolute-form target."""
    match = _ABSOLUTE.fullmatch(target)
    assert match is not None, "split_absolute is for targets target_form found absolute"
    scheme, authority, rest = match.groups()
    return scheme.lower(), authority, rest if rest.startswith("/") else "/" + rest
