"""The engine core's channel (engine/channel.py): commands in order, a channel's items in order and never lost
(also those put before its reader connected), a wrong token refused, the engine's death and a closed server
reaching the reader."""

from __future__ import annotations

import asyncio
import queue
import threading

import pytest

from nanovllm_ray.engine.channel import ChannelClient, ChannelClosed, ChannelServer


@pytest.fixture
def server():
    got: queue.SimpleQueue = queue.SimpleQueue()
    s = ChannelServer("127.0.0.1", got.put)
    s.got = got
    yield s
    s.close()


def test_commands_arrive_in_order_and_items_put_before_the_reader_are_kept(server):
    server.put("ingress-a", [("r1", 1)])  # before anyone reads it

    async def main():
        reader = await ChannelClient.connect(server.address, server.token, "ingress-a")
        control = await ChannelClient.connect(server.address, server.token, None)
        for i in range(50):
            control.send([("add", i)])
        received = list(await reader.recv())
        for i in range(2, 200):
            server.put("ingress-a", [("r1", i)])
        while len(received) < 199:
            received += await reader.recv()
        reader.close()
        control.close()
        return received

    received = asyncio.run(main())
    assert received == [("r1", 1)] + [("r1", i) for i in range(2, 200)]
    assert [server.got.get(timeout=5) for _ in range(50)] == [[("add", i)] for i in range(50)]


def test_a_client_without_the_token_is_refused(server):
    async def main():
        client = await ChannelClient.connect(server.address, b"0" * 16, "ingress-a")
        client.send([("add", "sneaky")])
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(client.recv(), 5)

    asyncio.run(main())
    assert server.got.empty()


def test_the_engines_death_reaches_the_reader_after_what_came_before(server):
    async def main():
        reader = await ChannelClient.connect(server.address, server.token, "ingress-a")
        server.put("ingress-a", [("r1", 1)])
        first = await asyncio.wait_for(reader.recv(), 5)
        server.put("ingress-a", [("r1", 2)])
        server.fail("the engine loop died: RuntimeError: boom")
        rest = []
        with pytest.raises(ChannelClosed, match="boom"):
            while True:
                rest += await asyncio.wait_for(reader.recv(), 5)
        return first + rest

    assert asyncio.run(main()) == [("r1", 1), ("r1", 2)]


def test_a_closed_server_ends_the_read(server):
    async def main():
        reader = await ChannelClient.connect(server.address, server.token, "ingress-a")
        server.put("ingress-a", [("r1", 1)])
        await asyncio.wait_for(reader.recv(), 5)
        threading.Timer(0.1, server.close).start()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(reader.recv(), 5)

    asyncio.run(main())


def test_a_reader_that_reconnects_takes_the_channel_over(server):
    async def main():
        old = await ChannelClient.connect(server.address, server.token, "ingress-a")
        server.put("ingress-a", [("r1", 1)])
        assert await asyncio.wait_for(old.recv(), 5) == [("r1", 1)]
        new = await ChannelClient.connect(server.address, server.token, "ingress-a")
        await asyncio.sleep(0.2)  # its hello is in
        server.put("ingress-a", [("r1", 2)])
        assert await asyncio.wait_for(new.recv(), 5) == [("r1", 2)]
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(old.recv(), 5)

    asyncio.run(main())


TOUCHED = []


def _touch() -> None:
    TOUCHED.append(1)


class _Payload:
    def __reduce__(self):
        return _touch, ()


def test_nothing_is_unpickled_before_the_token_matched(server):
    import pickle
    import socket

    from nanovllm_ray.engine.channel import HEADER

    data = pickle.dumps(_Payload())
    assert pickle.loads(data) is None and TOUCHED == [1]  # the payload does act when unpickled
    with socket.create_connection(server.address) as sock:
        sock.sendall(HEADER.pack(len(data)) + data + HEADER.pack(len(data)) + data)
        sock.settimeout(5)
        assert sock.recv(1) == b""  # refused: the connection closes
    assert TOUCHED == [1] and server.got.empty()


def test_a_frame_that_does_not_decode_closes_the_channel():
    """A reader given bytes it cannot unpickle raises ChannelClosed (its requests fail) rather than some other error
    that would leave them waiting."""
    import socket

    from nanovllm_ray.engine.channel import HEADER, NAME_LEN, TOKEN_BYTES

    listener = socket.create_server(("127.0.0.1", 0))

    def serve_garbage():
        conn, _ = listener.accept()
        with conn:
            hello = b""
            while len(hello) < TOKEN_BYTES + NAME_LEN.size:
                hello += conn.recv(64)
            conn.sendall(HEADER.pack(7) + b"garbage")
            conn.recv(1)  # until the client closes

    threading.Thread(target=serve_garbage, daemon=True).start()

    async def main():
        client = await ChannelClient.connect(listener.getsockname(), b"0" * TOKEN_BYTES, "ingress-a")
        with pytest.raises(ChannelClosed, match="did not decode"):
            await asyncio.wait_for(client.recv(), 5)
        with pytest.raises(ChannelClosed, match="did not decode"):  # and stays closed
            await client.recv()
        client.close()

    asyncio.run(main())
    listener.close()
