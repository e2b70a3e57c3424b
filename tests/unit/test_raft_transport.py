"""The Raft peer transport's cipher (``replication.raft.PeerCipher``): each side's
first frame on a link is sealed under the cluster key, every later one under a
key of its direction derived from both sides' random keys, with a counter
nonce; so a frame opens exactly once, in order, on its own link, a replayed
opening only starts a link with new keys, and a frame is not compressed."""

from __future__ import annotations

import os
import pickle

import pytest
from cryptography.exceptions import InvalidTag

from replication.raft import PeerCipher


class Link:
    """One end of a pysyncobj link: just the two random keys it carries."""

    def __init__(self) -> None:
        self.sendRandKey: bytes | None = None
        self.recvRandKey: bytes | None = None


def handshake(cipher: PeerCipher, opening: bytes | None = None) -> tuple[Link, Link]:
    """pysyncobj's opening: the connecting side sends its random key, the
    accepting side answers with both. ``opening`` replays a recorded first frame
    instead of a new client's (the client returned is then a fresh one that
    never takes part)."""
    client, server = Link(), Link()
    client.recvRandKey = os.urandom(32)
    first = sealed(cipher, client, pickle.dumps(client.recvRandKey))
    server.sendRandKey = pickle.loads(cipher.open(server, opening or first))
    server.recvRandKey = os.urandom(32)
    reply = sealed(cipher, server, pickle.dumps((server.sendRandKey, server.recvRandKey)))
    if opening is None:
        key, server_key = pickle.loads(cipher.open(client, reply))
        assert key == client.recvRandKey
        client.sendRandKey = server_key
    return client, server


def sealed(cipher: PeerCipher, link: Link, data: bytes) -> bytes:
    frame = cipher.seal(link, data)
    assert frame is not None
    return frame


@pytest.fixture(scope="module")
def cipher() -> PeerCipher:
    return PeerCipher("test-secret")


def test_frames_open_in_order_both_ways(cipher: PeerCipher) -> None:
    client, server = handshake(cipher)
    for i in range(3):
        assert cipher.open(server, sealed(cipher, client, b"c%d" % i)) == b"c%d" % i
        assert cipher.open(client, sealed(cipher, server, b"s%d" % i)) == b"s%d" % i


def test_a_replayed_or_reordered_frame_does_not_open(cipher: PeerCipher) -> None:
    client, server = handshake(cipher)
    a, b = sealed(cipher, client, b"a"), sealed(cipher, client, b"b")
    with pytest.raises(InvalidTag):
        cipher.open(server, b)  # b before a
    assert cipher.open(server, a) == b"a"
    with pytest.raises(InvalidTag):
        cipher.open(server, a)  # a again


def test_a_frame_of_another_link_does_not_open(cipher: PeerCipher) -> None:
    client1, _server1 = handshake(cipher)
    _client2, server2 = handshake(cipher)
    with pytest.raises(InvalidTag):
        cipher.open(server2, sealed(cipher, client1, b"x"))


def test_a_tampered_frame_or_another_secret_does_not_open(cipher: PeerCipher) -> None:
    client, server = handshake(cipher)
    frame = bytearray(sealed(cipher, client, b"hello"))
    frame[-1] ^= 1
    with pytest.raises(InvalidTag):
        cipher.open(server, bytes(frame))
    stranger = Link()
    stranger.recvRandKey = os.urandom(32)
    with pytest.raises(InvalidTag):
        cipher.open(Link(), sealed(PeerCipher("another-secret"), stranger, b"k"))


def test_an_opening_frame_is_only_accepted_first(cipher: PeerCipher) -> None:
    """Once a link has opened, a frame under the cluster key (say, a recorded
    opening of an earlier link) is refused, and so is anything but an opening
    as a link's first frame."""
    recorded = sealed(cipher, Link(), pickle.dumps(os.urandom(32)))
    client, server = handshake(cipher)
    with pytest.raises(ValueError):
        cipher.open(server, recorded)
    with pytest.raises(ValueError):
        cipher.open(server, b"")
    with pytest.raises(ValueError):
        cipher.open(Link(), sealed(cipher, client, b"sealed, not an opening"))


def test_a_replayed_opening_gets_new_keys(cipher: PeerCipher) -> None:
    """Replaying a client's first frame to the server starts a second link; the
    server must not seal anything there under a key and nonce it already used
    on the first link (the same plaintext must never give the same frame)."""
    recorded_client = Link()
    recorded_client.recvRandKey = os.urandom(32)
    recorded = sealed(cipher, recorded_client, pickle.dumps(recorded_client.recvRandKey))
    _, server1 = handshake(cipher, opening=recorded)
    _, server2 = handshake(cipher, opening=recorded)
    frames1 = [sealed(cipher, server1, b"heartbeat") for _ in range(3)]
    frames2 = [sealed(cipher, server2, b"heartbeat") for _ in range(3)]
    assert not set(frames1) & set(frames2)


def test_frames_are_not_compressed(cipher: PeerCipher) -> None:
    """A full batch entry is sealed as it is (zlib + Fernet took 836 µs per
    follower for a 1,000-command entry, ``bench.replication.frame_costs``): the
    frame is the plaintext plus 17 bytes."""
    client, server = handshake(cipher)
    data = bytes(100_000)  # would compress to almost nothing
    frame = sealed(cipher, client, data)
    assert len(frame) == len(data) + 1 + 16
    assert cipher.open(server, frame) == data


def test_nothing_is_sealed_while_a_link_is_opening(cipher: PeerCipher) -> None:
    """pysyncobj may send on a connected socket before the other side's random
    key has arrived: such a message gets no frame (it is dropped, Raft re-sends)
    instead of raising in the tick thread."""
    client = Link()
    client.recvRandKey = os.urandom(32)
    assert cipher.seal(client, b"my random key") is not None
    assert cipher.seal(client, b"a vote request, too early") is None
