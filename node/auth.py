"""Keys derived from the cluster secret, and login tokens (JWT, HS256).

One secret file per cluster. Each use gets its own key, derived with HMAC and
a label, so a token key never doubles as the Raft password. The application's
own backend can issue tokens with the same secret (``issue_token``, or any JWT
library: HS256, ``sub`` = user name, ``exp`` required, key from ``token_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

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


def verify_token(key: bytes, token: str, user: str, now: float | None = None) -> None:
    """Raise ``AuthError`` unless ``token`` is a valid, unexpired token for ``user``.

    Expiry is checked against ``now`` (the node's wall clock) rather than by PyJWT,
    so that the node's clock hook applies to it too.
    """
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"],
                            options={"require": ["sub", "exp"], "verify_exp": False,
                                     "verify_iat": False, "verify_nbf": False})
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("invalid token: exp is not a number")
    if (time.time() if now is None else now) > exp + LEEWAY:
        raise AuthError("token expired")
    if claims.get("sub") != user:
        raise AuthError("token is for another user")


def hash_resume_token(token: str) -> bytes:
    """Resume tokens are stored only as this hash in the replicated table."""
    return hashlib.sha256(token.encode()).digest()


def new_resume_token() -> str:
    return secrets.token_urlsafe(24)


def new_session_id() -> str:
    return secrets.token_hex(12)
