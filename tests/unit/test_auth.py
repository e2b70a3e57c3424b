"""Login tokens: what ``verify_token`` accepts and refuses, and that it prepares
each key once rather than for every token."""

from __future__ import annotations

import jwt
import pytest
from jwt.algorithms import HMACAlgorithm

from node.auth import AuthError, issue_token, verify_token

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_a_valid_token_passes() -> None:
    verify_token(KEY, issue_token(KEY, "alice", now=NOW), "alice", now=NOW)


@pytest.mark.parametrize(("token", "message"), [
    (issue_token(b"x" * 32, "alice", now=NOW), "invalid token: Signature verification failed"),
    ("not-a-token", "invalid token: Not enough segments"),
    (issue_token(KEY, "bob", now=NOW), "token is for another user"),
    (issue_token(KEY, "alice", ttl=10, now=NOW - 60), "token expired"),
    (jwt.encode({"sub": "alice"}, KEY, algorithm="HS256"),
     'invalid token: Token is missing the "exp" claim'),
    (jwt.encode({"exp": NOW + 60}, KEY, algorithm="HS256"),
     'invalid token: Token is missing the "sub" claim'),
    (jwt.encode({"sub": "alice", "exp": "soon"}, KEY, algorithm="HS256"),
     "invalid token: exp is not a number"),
    (jwt.encode({"sub": "alice", "exp": NOW + 60, "aud": "x"}, KEY, algorithm="HS256"),
     "invalid token: Invalid audience"),
    (jwt.encode({"sub": "alice", "exp": NOW + 60}, KEY * 2, algorithm="HS512"),
     "invalid token: The specified alg value is not allowed"),
    (jwt.api_jws.encode(b"[1, 2]", KEY, algorithm="HS256"),
     "invalid token: its payload is not a JSON object"),
    (jwt.api_jws.encode(b"\xff{", KEY, algorithm="HS256"),
     "invalid token: its payload is not JSON"),
])
def test_a_bad_token_is_refused_with_one_line(token: str, message: str) -> None:
    with pytest.raises(AuthError) as e:
        verify_token(KEY, token, "alice", now=NOW)
    assert str(e.value) == message


def test_each_key_is_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT would prepare (and try to parse) the key on every token."""
    prepared: list[bytes] = []
    base = HMACAlgorithm.prepare_key

    def counting(self: HMACAlgorithm, key: bytes | str) -> bytes:
        prepared.append(key if isinstance(key, bytes) else key.encode())
        return base(self, key)

    monkeypatch.setattr(HMACAlgorithm, "prepare_key", counting)
    other = b"o" * 32
    for _ in range(5):
        verify_token(other, issue_token(other, "alice", now=NOW), "alice", now=NOW)
    for _ in range(5):
        verify_token(KEY, issue_token(KEY, "alice", now=NOW), "alice", now=NOW)
    # issue_token prepares through PyJWT's own HS256: count only verify_token's.
    assert prepared.count(other) == 5 + 1
    assert prepared.count(KEY) == 5 + 1
    # A new key (a rotated secret) is prepared, and the old one no longer passes.
    with pytest.raises(AuthError):
        verify_token(KEY, issue_token(other, "alice", now=NOW), "alice", now=NOW)
