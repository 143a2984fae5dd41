"""Who may do what: one rule a user can remember.

A server bound to loopback trusts its machine's user; a server bound to anything else trusts nobody until
configured (``trust_loopback = false`` makes a loopback bind as wary, for a server behind a reverse proxy). So on a non-loopback bind every control request (repository load, unload and index, the replica
listing, the model listings: anything that changes or reveals the model set) is refused with 401 unless a
``control_token`` is configured and the request carries it (``Authorization: Bearer <token>``, compared in
constant time). With a token configured it is required on every bind. ``model_control = "none"`` turns
loading and unloading through the API off entirely (the server serves what its repository, models file or
TrainedModels declare, like Triton's ``--model-control-mode=none``). Inference and per-model metadata need
an ``inference_token`` only when one is configured; health and server metadata are always open.

Storage follows the same rule: on a non-loopback bind, or whenever ``allow_storage`` is set, a model may come
only from an allowed prefix (``allow_storage``), the model repository or the pvc root, whatever path it comes
in by (HTTP, models file, restore, Kubernetes); local paths are resolved (links and ``..`` included) and must
stay inside those roots. Plain functions and values; the HTTP layer and the registry apply them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

from rayms.config import Settings
from rayms.errors import Forbidden, Unauthorized
from rayms.ports import is_loopback_address
from rayms.redact import redact

logger = logging.getLogger("rayms.access")

OPEN, INFERENCE, CONTROL, CHANGE = "open", "inference", "control", "change"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is this machine only."""
    if is_loopback_address(host):
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
        return False  # an address, and not a loopback one
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def route_kind(method: str, path: str) -> str:
    """What a request is, for access: :data:`OPEN`, :data:`INFERENCE`, :data:`CONTROL` (reveals the model
    set) or :data:`CHANGE` (changes it)."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[:2] == ["v2", "health"] or parts == ["v2"] or parts[0] in ("docs", "openapi.json"):
        return OPEN
    if parts[:2] == ["v2", "repository"]:
        return CHANGE if method == "POST" and parts[-1] in ("load", "unload") else CONTROL
    if parts[1:] == ["models"] and parts[0] in ("v1", "v2"):
        return CONTROL  # listing every model
    return INFERENCE


def _token(value, path: str | None) -> str | None:
    if value is not None:
        token = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        if token.strip():  # an empty token is no token (RAYMS_CONTROL_TOKEN= turns it off)
            return token.strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            # Configured but unreadable (a Secret not created yet): nobody gets in, rather than everybody.
            logger.error("token file %s cannot be read (%s): requests that need it are refused", path, exc)
            return _UNREADABLE
        return token or _UNREADABLE
    return None


_UNREADABLE = "\x00unreadable\x00"  # no Authorization header can carry it: every comparison fails


class AccessPolicy:
    """The access rule of one server, from its settings (token files are read once, here)."""

    def __init__(self, settings: Settings) -> None:
        self.trusted = settings.trust_loopback and is_loopback(settings.host)
        self._control = _token(settings.control_token, settings.control_token_file)
        self._inference = _token(settings.inference_token, settings.inference_token_file)
        self._changes = settings.model_control == "api"

    def refuse(self, kind: str, authorization: bytes | None) -> Exception | None:
        """The error a request of ``kind`` gets with this ``Authorization`` header, or None if it may pass."""
        if kind == OPEN:
            return None
        if kind == INFERENCE:
            if self._inference is None or self._matches(authorization, self._inference, self._control):
                return None
            return Unauthorized("inference needs the inference token: send 'Authorization: Bearer <token>'")
        if kind == CHANGE and not self._changes:
            return Forbidden("loading and unloading through the API is off on this server (model_control=none)")
        if self._control is None:
            if self.trusted:
                return None
            return Unauthorized("the control API of a server bound beyond loopback needs a credential: "
                                "configure control_token (RAYMS_CONTROL_TOKEN) and send it as a bearer token")
        if self._matches(authorization, self._control):
            return None
        return Unauthorized("the control API needs the control token: send 'Authorization: Bearer <token>'")

    @staticmethod
    def _matches(authorization: bytes | None, *tokens: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, given = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = given.strip().encode()
        return any(token is not None and hmac.compare_digest(given, token.encode()) for token in tokens)


# ------------------------------------------------------------------------------------------ storage
def check_storage(settings: Settings, uri: str) -> None:
    """Refuse (403) a storage location this server may not load from; see the module's description."""
    allowed = list(settings.allow_storage)
    if settings.trust_loopback and is_loopback(settings.host) and not allowed:
        return  # the machine's user may load from anywhere they can read
    local = _local_path(settings, uri)
    roots = [p for p in (settings.model_repository, settings.pvc_root) if p] + [
        a for a in allowed if "://" not in a or a.startswith("file://")]
    if local is not None:
        real = os.path.realpath(local)
        for root in roots:
            base = os.path.realpath(os.path.expanduser(root.removeprefix("file://")))
            if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
                return
    else:
        target = uri.split("?", 1)[0]
        if any(target.startswith(prefix) for prefix in allowed if "://" in prefix and not prefix.startswith("file://")):
            return
    raise Forbidden(f"storage {redact(uri)} is not allowed on this server: allowed are the model repository, "
                    "the pvc root and the prefixes of allow_storage (--allow-storage)")


def _local_path(settings: Settings, uri: str) -> str | None:
    """The local path a URI names (a path, ``file://`` or ``pvc://``), else None."""
    if uri.startswith("pvc://"):
        parts = urlsplit(uri)
        return os.path.join(settings.pvc_root, parts.netloc, unquote(parts.path).lstrip("/"))
    if uri.startswith("file://"):
        return unquote(urlsplit(uri).path)
    if "://" not in uri:
        return os.path.expanduser(uri)
    return None
