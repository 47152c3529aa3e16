"""A TCP socket between the engine core and each of its clients: commands in, a channel's items out.

Through Ray, each read of a channel was a call served on the engine core's event loop, and each cost that process
about 1 ms of CPU on the 2-core machine (0.3-0.4 ms on an H200 host), most of it holding the GIL the engine thread
needs. Every reader made one per engine step, so the engine's decode steps grew with the number of readers (two
replicas on 2 x H200: 5.1 ms with two readers per core, 6.5 ms with four). Here each client holds one connection,
served by two threads that wait outside the GIL; a frame costs a pickle (about 10 us for a step's 64 outputs) and a
send. Commands skip a Ray call too (about 1.6 ms of a request's way in on the 2-core machine).

A connection starts with a hello from the client, in plain bytes: the server's token (16 random bytes; it reaches
clients through Ray, in engine.core.CoreRef), then the length and UTF-8 name of the channel it reads (length 0: none).
Nothing is unpickled before the token matched. After that, frames are a 4-byte big-endian length and a pickle: each
client frame a list of commands, each server frame (items, dead): everything the channel got since the last frame,
and the error message once the engine has died. Items for a channel nobody
reads yet are kept (a reader connects after its first request's outputs may have come), for CHANNEL_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
TOKEN_BYTES = 16
NAME_LEN = struct.Struct("!H")
CHANNEL_TIMEOUT_S = 120.0  # what a channel holds is dropped once nobody has read it for this long


class ChannelClosed(ConnectionError):
    """The engine core closed the connection, or the engine died (the message says which)."""


def encode(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def hello(token: bytes, channel: str | None) -> bytes:
    name = (channel or "").encode()
    return token + NAME_LEN.pack(len(name)) + name


def _recv_frame(sock: socket.socket) -> Any:
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    data = _recv_exact(sock, HEADER.unpack(head)[0])
    return None if data is None else pickle.loads(data)


class _Channel:
    __slots__ = ("items", "conn", "last_seen")

    def __init__(self) -> None:
        self.items: list = []
        self.conn: _Conn | None = None
        self.last_seen = time.monotonic()


class _Conn:
    """One client: a reader thread (its hello, then its commands) and a writer thread (its channel's items)."""

    def __init__(self, server: ChannelServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.channel: _Channel | None = None
        self.wake = threading.Condition(server.lock)
        self.closed = False  # the writer stops
        self._shut = False  # the socket is closed
        threading.Thread(target=self._read, name="channel-read", daemon=True).start()

    def _read(self) -> None:
        server = self.server
        try:
            head = _recv_exact(self.sock, TOKEN_BYTES + NAME_LEN.size)
            if head is None or not hmac.compare_digest(head[:TOKEN_BYTES], server.token):
                logger.warning("channel: a connection without the token was refused")
                return
            raw = _recv_exact(self.sock, NAME_LEN.unpack(head[TOKEN_BYTES:])[0])
            name = raw.decode() if raw else None
            if name is not None:
                server.attach(self, name)
                threading.Thread(target=self._write, name=f"channel-write-{name}", daemon=True).start()
            while (commands := _recv_frame(self.sock)) is not None:
                server.on_commands(commands)
        except OSError:
            pass
        finally:
            self.close()

    def _write(self) -> None:
        server = self.server
        try:
            while True:
                with self.wake:
                    ch = self.channel
                    while not self.closed and not ch.items and server.dead is None:
                        self.wake.wait()
                    if self.closed:
                        return
                    items, ch.items = ch.items, []
                    dead = server.dead
                self.sock.sendall(encode((items, dead)))
                if dead is not None:
                    return
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        with self.server.lock:
            self.closed = True
            if self.channel is not None and self.channel.conn is self:
                self.channel.conn = None
                self.channel.last_seen = time.monotonic()
            self.wake.notify_all()
            if self._shut:
                return
            self._shut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ChannelServer:
    """In the engine core's process. put() (any thread) adds items to a channel; fail() tells every client the
    engine died. on_commands(list) is called on a connection's reader thread."""

    def __init__(self, host: str, on_commands: Callable[[list], None]) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.on_commands = on_commands
        self.lock = threading.Lock()
        self.channels: dict[str, _Channel] = {}
        self.dead: str | None = None
        self._sock = socket.create_server((host, 0))
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name="channel-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:  # closed
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Conn(self, sock)

    def attach(self, conn: _Conn, name: str) -> None:
        with self.lock:
            ch = self.channels.get(name)
            if ch is None:
                ch = self.channels[name] = _Channel()
            old = ch.conn  # a reader that reconnected: the newer connection reads from now on
            ch.conn, conn.channel = conn, ch
            if old is not None:
                old.closed = True
                old.wake.notify_all()
            conn.wake.notify_all()

    def put(self, name: str, items: list) -> None:
        with self.lock:
            ch = self.channels.get(name)
            if ch is None:
                ch = self.channels[name] = _Channel()
            if ch.conn is None and time.monotonic() - ch.last_seen > CHANNEL_TIMEOUT_S:
                ch.items = []  # its reader is gone (an ingress replica that died)
                ch.last_seen = time.monotonic()
            ch.items += items
            if ch.conn is not None:
                ch.conn.wake.notify()

    def fail(self, message: str) -> None:
        with self.lock:
            self.dead = message
            for ch in self.channels.values():
                if ch.conn is not None:
                    ch.conn.wake.notify()

    def close(self) -> None:
        self._sock.close()
        with self.lock:
            conns = [ch.conn for ch in self.channels.values() if ch.conn is not None]
        for conn in conns:
            conn.close()


class ChannelClient:
    """A client's end, on its asyncio loop: send() commands, recv() the channel's items."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._dead: str | None = None

    @classmethod
    async def connect(cls, address: tuple[str, int], token: bytes, channel: str | None = None) -> ChannelClient:
        reader, writer = await asyncio.open_connection(*address)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A core whose node is gone sends no FIN: probe an idle connection (Linux) so the read ends within ~30 s.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        writer.write(hello(token, channel))
        return cls(reader, writer)

    def send(self, commands: list) -> None:
        self._writer.write(encode(commands))

    async def recv(self) -> list:
        """The channel's items since the last frame. Raises ChannelClosed when the engine died or the connection
        ended (the engine core's process is gone)."""
        if self._dead is not None:
            raise ChannelClosed(self._dead)
        try:
            head = await self._reader.readexactly(HEADER.size)
            data = await self._reader.readexactly(HEADER.unpack(head)[0])
        except (asyncio.IncompleteReadError, OSError) as e:
            raise ChannelClosed(f"the engine core closed its connection ({type(e).__name__})") from e
        try:
            items, self._dead = pickle.loads(data)
        except Exception as e:  # a frame that does not decode: nothing after it can be trusted either
            self._dead = f"a frame from the engine core did not decode: {type(e).__name__}: {e}"
            raise ChannelClosed(self._dead) from e
        if self._dead is not None and not items:
            raise ChannelClosed(self._dead)
        return items  # with the death, if it came: the next recv raises

    def close(self) -> None:
        self._writer.close()
