"""Credentials never leave the process: one function that takes them out of any text.

Storage URIs carry secrets in two places: the user-info part (``https://user:password@host/...``,
``s3://KEY:SECRET@bucket/...``) and the query string of presigned and SAS URLs (``X-Amz-Signature``,
``X-Goog-Signature``, Azure's ``sig``, ``token``...). :func:`redact` replaces both with ``***`` wherever they
appear in a text: a URI, an error message quoting one, a log line. It is applied where text leaves rayms (the
repository index, error answers, model statuses and so TrainedModel status, and every rayms log record once
:func:`install_log_redaction` has run in the process). The state file keeps the full URI, since a restore needs
it; it is written readable by the server's user only.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user[:password]@  ->  scheme://***@
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]{0,30}://)(?P<info>[^/@\s?#'\"]{1,2048})@")

# ?...&name=value in query strings, for names that carry a credential (case-insensitive)
_SECRET_PARAMS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "signature", "sig", "token", "access_token", "password", "passwd", "secret", "key", "api_key", "apikey",
    "code", "se", "sv", "skoid", "sktid", "skt", "ske", "sks", "skv",
)
_QUERY_SECRET = re.compile(
    r"(?P<lead>[?&;](?:" + "|".join(re.escape(name) for name in _SECRET_PARAMS) + r")=)(?P<value>[^&;#\s'\"]{1,4096})",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with user-info and credential query parameters of every URI in it replaced by ``***``."""
    if not text or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('lead')}{MASK}", text)


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of the ``rayms`` loggers of this process (message and arguments) as it is
    made, whatever handler writes it. Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.startswith("rayms"):
            try:
                message = record.getMessage()
            except Exception:  # a broken format string: leave the record to logging's own error path
                return record
            record.msg, record.args = redact(message), None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
