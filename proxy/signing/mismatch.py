"""Why AWS refused a signature: what it expected, beside what we signed, and the likely cause.

When a signature does not match, AWS usually says which canonical request
and string to sign it computed: API Gateway in its JSON ``message``, S3 in
``<CanonicalRequest>`` and ``<StringToSign>`` elements. Comparing them line by
line with ours names the cause almost every time:

* the scope differs: wrong region or service;
* the canonical URI or query differs: the path or query was changed between
  the proxy and AWS (or the service encodes paths differently);
* a header line differs: a signed header was changed by an intermediary;
* the payload hash differs: the body was changed on the way;
* both are identical: the secret key is wrong or the session token stale.

Pure text work; the session token's value is never part of what it returns.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from dataclasses import dataclass

from . import redact_canonical

_MISMATCH = re.compile(
    r"signature we calculated does not match|SignatureDoesNotMatch|should be scoped to|signature expired|"
    r"too skewed|RequestTimeTooSkewed|RequestExpired|AuthorizationHeaderMalformed",
    re.IGNORECASE,
)
_APIGW_CANONICAL = re.compile(r"Canonical String for this request should have been\s*'(.*?)'\s*\n\s*\n", re.S)
_APIGW_TO_SIGN = re.compile(r"String-to-Sign should have been\s*'(.*?)'\s*(?:\n|$)", re.S)
_XML_ELEMENT = "<{0}>(.*?)</{0}>"
_SCOPE_ERROR = re.compile(r"should be scoped to[^.]*|the region '[^']*' is wrong; expecting '[^']*'", re.IGNORECASE)
_SKEW = re.compile(r"signature expired|too skewed|RequestTimeTooSkewed|RequestExpired", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Explanation:
    """What a signature mismatch answer says, set against what we signed."""

    cause: str  # one sentence naming the likely cause
    diff: str  # ours (-) against AWS's (+), line by line; empty when AWS did not say


def is_mismatch(body: bytes) -> bool:
    """True when a 403 body says the signature was refused (any of the wordings AWS uses)."""
    return _MISMATCH.search(body.decode("utf-8", "replace")) is not None


def expected_by_aws(body: bytes) -> tuple[str | None, str | None, str]:
    """``(canonical_request, string_to_sign, message)`` from an API Gateway JSON or S3 XML answer."""
    text = body.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("message") or json.loads(text).get("Message") or ""
    except (ValueError, AttributeError):
        message = ""
    if message:
        canonical = _APIGW_CANONICAL.search(message + "\n\n")
        to_sign = _APIGW_TO_SIGN.search(message)
        return (canonical.group(1) if canonical else None), (to_sign.group(1) if to_sign else None), message
    found = [re.search(_XML_ELEMENT.format(name), text, re.S) for name in ("CanonicalRequest", "StringToSign")]
    xml_message = re.search(_XML_ELEMENT.format("Message"), text, re.S)
    canonical, to_sign = (html.unescape(m.group(1)) if m else None for m in found)
    return canonical, to_sign, html.unescape(xml_message.group(1)) if xml_message else text[:200]


def explain(our_canonical: str, our_string_to_sign: str, body: bytes) -> Explanation:
    """The likely cause of a refused signature and the line-by-line diff, from AWS's answer ``body``."""
    canonical, to_sign, message = expected_by_aws(body)
    if _SKEW.search(message):
        return Explanation("clock skew: X-Amz-Date is too far from AWS's clock; fix this machine's clock", "")
    scope_error = _SCOPE_ERROR.search(message)
    ours_sts = our_string_to_sign.split("\n")
    if to_sign is not None:
        theirs_sts = to_sign.split("\n")
        if len(theirs_sts) > 2 and len(ours_sts) > 2 and theirs_sts[2] != ours_sts[2]:
            return Explanation(
                f"region or service in the scope: we signed {ours_sts[2]}, AWS expected {theirs_sts[2]}; "
                "set the route's region or service",
                _diff(our_string_to_sign, to_sign, "string to sign"),
            )
    elif scope_error:
        said = scope_error.group(0)
        said = f"the credential {said}" if said.startswith("should") else said
        return Explanation(f"region or service in the scope: AWS says {said}; set the route's region or service", "")
    if canonical is None:
        return Explanation(f"AWS did not say what it expected ({message[:120]!r})", "")
    ours, theirs = redact_canonical(our_canonical), redact_canonical(canonical)
    if ours == theirs:
        return Explanation(
            "identical canonical requests: the secret key is wrong for this access key id, "
            "or the session token is stale",
            "",
        )
    return Explanation(_cause(ours.split("\n"), theirs.split("\n")), _diff(ours, theirs, "canonical request"))


def _cause(ours: list[str], theirs: list[str]) -> str:
    """Name the first part of the canonical request that differs."""
    if ours[:1] != theirs[:1]:
        return f"the method was changed in between: we signed {ours[0]}, AWS received {theirs[0]}"
    if ours[1:2] != theirs[1:2]:
        return (
            "the path was changed between the proxy and AWS, or the service encodes paths another way "
            "(S3 needs service: s3)"
        )
    if ours[2:3] != theirs[2:3]:
        return "the query was changed between the proxy and AWS"
    if ours[-1:] != theirs[-1:]:
        return "the body was changed on the way (its hash differs)"
    headers_ours = {line.partition(":")[0]: line for line in ours[3:-3] if ":" in line}
    headers_theirs = {line.partition(":")[0]: line for line in theirs[3:-3] if ":" in line}
    changed = sorted(name for name in headers_ours.keys() | headers_theirs.keys()
                     if headers_ours.get(name) != headers_theirs.get(name))  # fmt: skip
    if changed:
        return f"a signed header was changed by an intermediary: {', '.join(changed)}"
    return "the signed header list differs"


def _diff(ours: str, theirs: str, what: str) -> str:
    lines = difflib.unified_diff(
        ours.split("\n"), theirs.split("\n"), f"{what} signed by the proxy", f"{what} AWS expected", lineterm="", n=9
    )
    return "\n".join(lines)
