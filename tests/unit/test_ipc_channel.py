"""The core-worker channel (``node.ipc.Channel``) over a real socket pair: order,
a frame larger than the socket buffer, a peer that goes away, and the steps
a flush costs the writer task."""

from __future__ import annotations

import socket
from typing import Any

import trio
import trio.testing

from node.ipc import Channel, IpcDecoder, encode_ipc


class _Steps(trio.abc.Instrument):
    """Records the name of every task step, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


def _read_frames(sock: socket.socket, want: int) -> list[dict[str, Any]]:
    sock.setblocking(True)
    sock.settimeout(10)
    dec = IpcDecoder()
    got: list[dict[str, Any]] = []
    while len(got) < want:
        data = sock.recv(1 << 20)
        assert data, "channel closed early"
        dec.feed(data)
        got.extend(dec.frames())
    return got


async def test_frames_arrive_in_order_both_ways() -> None:
    a, b = socket.socketpair()
    left, right = Channel(a, "right"), Channel(b, "left")
    seen: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(left.writer)
            n.start_soon(right.reader, lambda f: seen.append(f["i"]))
            for i in range(2000):
                left.send({"t": "x", "i": i, "pad": b"p" * (i % 300)})
                if i % 97 == 0:
                    await trio.sleep(0)
            while len(seen) < 2000:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert seen == list(range(2000))
    a.close()
    b.close()


async def test_a_frame_larger_than_the_socket_buffer_waits_and_arrives_whole() -> None:
    a, b = socket.socketpair()
    ch = Channel(a, "peer")
    big = b"z" * (8 << 20)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(ch.writer)
            ch.send({"t": "big", "b": big})
            ch.send({"t": "after"})
            got = await trio.to_thread.run_sync(_read_frames, b, 2)
            n.cancel_scope.cancel()
    assert [f["t"] for f in got] == ["big", "after"]
    assert got[0]["b"] == big
    a.close()
    b.close()


async def test_the_writer_ends_when_the_peer_is_gone() -> None:
    a, b = socket.socketpair()
    ch = Channel(a, "peer")
    b.close()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(ch.writer)
            ch.send({"t": "x", "b": b"y" * (1 << 20)})
    assert ch.closed
    a.close()


async def test_the_reader_returns_at_end_of_file() -> None:
    a, b = socket.socketpair()
    ch = Channel(a, "peer")
    seen: list[str] = []
    b.sendall(encode_ipc({"t": "last"}))
    b.close()
    with trio.fail_after(10):
        await ch.reader(lambda f: seen.append(f["t"]))
    assert seen == ["last"]
    assert ch.closed
    a.close()


async def test_a_flush_takes_one_step_of_the_writer() -> None:
    """The writer parks again in the step that wrote: Trio's ``send_all`` ends
    with a checkpoint, one more pass of the event loop per flush, on every
    frame between the core and its workers."""
    a, b = socket.socketpair()
    ch = Channel(a, "peer")
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(ch.writer, name="writer")
                await trio.testing.wait_all_tasks_blocked()
                mark = len(steps.names)
                ch.send({"t": "x"})
                await trio.testing.wait_all_tasks_blocked()
                assert steps.names[mark:].count("writer") == 1
                assert _read_frames(b, 1) == [{"t": "x"}]
                n.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
        a.close()
        b.close()
