"""Keys derived from the cluster secret, and login tokens (JWT, HS256).

One secret file per cluster. Each use gets its own key, derived with HMAC and
a label, so a token key never doubles as the Raft password. The application's
own backend can issue tokens with the same secret (``issue_token``, or any JWT
library: HS256, ``sub`` = user name, ``exp`` required, key from ``token_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

ISSUER = "switchboard"
MIN_SECRET_BYTES = 16


class SecretError(Exception):
    """The cluster secret file is missing, unreadable or too short."""


class AuthError(Exception):
    """A login token is wrong, forged or expired."""


@dataclass(frozen=True)
class Keys:
    token: bytes
    raft_password: str | None  # None only with --insecure-no-secret
    admin: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> Keys:
        def derive(label: bytes) -> bytes:
            return hmac.new(secret, b"switchboard/" + label + b"/v1", hashlib.sha256).digest()

        return cls(token=derive(b"token"), raft_password=derive(b"raft").hex(),
                   admin=derive(b"admin"))

    @classmethod
    def insecure(cls) -> Keys:
        """No cluster secret (--insecure-no-secret): Raft traffic is unauthenticated
        and unencrypted, and the token and admin keys are public knowledge."""
        k = cls.from_secret(b"switchboard-insecure-no-secret")
        return cls(token=k.token, raft_password=None, admin=k.admin)


def create_secret_file(path: Path) -> bool:
    """Create ``path`` with a fresh random secret, mode 0600; False if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


def read_secret(path: Path) -> bytes:
    try:
        raw = path.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read the secret file {path}: {e.strerror}") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise SecretError(f"the secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return raw


def issue_token(key: bytes, user: str, ttl: float = 3600.0, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"sub": user, "iat": int(now), "exp": int(now + ttl), "iss": ISSUER}
    return jwt.encode(claims, key, algorithm="HS256")


LEEWAY = 5.0


class _PreparedHS256(HMACAlgorithm):
    """HS256 that prepares each key once, not on every token.

    PyJWT prepares the key for every decode, first trying it as a DER public
    key and as a DER certificate (two parse attempts that raise): that took
    about 40 % of ``verify_token`` and a fifth of a gateway worker's CPU per
    login (py-spy, 2026-11-27). The last key is kept with its prepared form.
    """

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._last: tuple[Any, bytes] | None = None  # (key, prepared); one tuple: swapped whole

    def prepare_key(self, key: Any) -> bytes:
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        prepared = super().prepare_key(key)
        self._last = (key, prepared)
        return prepared


_JWS = jwt.PyJWS(algorithms=["HS256"])
_JWS.unregister_algorithm("HS256")
_JWS.register_algorithm("HS256", _PreparedHS256())


def verify_token(key: bytes, token: str, user: str, now: float | None = None) -> None:
    """Raise ``AuthError`` unless ``token`` is a valid, unexpired token for ``user``.

    The signature is checked by PyJWT (``PyJWS``, HS256 only); the claims here:
    ``sub`` and ``exp`` are required, and a token with an audience is refused,
    as ``jwt.decode`` without an audience does. Expiry is checked against
    ``now`` (the node's wall clock), so that the node's clock hook applies to it.
    """
    try:
        payload = _JWS.decode_complete(token, key, algorithms=["HS256"])["payload"]
        claims = json.loads(payload)
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
        raise AuthError("invalid token: its payload is not JSON") from None
    if not isinstance(claims, dict):
        raise AuthError("invalid token: its payload is not a JSON object")
    for claim in ("sub", "exp"):
        if claim not in claims:
            raise AuthError(f'invalid token: Token is missing the "{claim}" claim')
    if "aud" in claims:
        raise AuthError("invalid token: Invalid audience")
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("invalid token: exp is not a number")
    if (time.time() if now is None else now) > exp + LEEWAY:
        raise AuthError("token expired")
    if claims["sub"] != user:
        raise AuthError("token is for another user")


def hash_resume_token(token: str) -> bytes:
    """Resume tokens are stored only as this hash in the replicated table."""
    return hashlib.sha256(token.encode()).digest()


def new_resume_token() -> str:
    return secrets.token_urlsafe(24)


def new_session_id() -> str:
    return secrets.token_hex(12)
