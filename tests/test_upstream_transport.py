"""The upstream client's transport (``proxy.upstream.AiohttpTransport``): httpx's interface over
aiohttp, against real servers on loopback — plain and TLS, kept-alive connections, cookies, and
every failure raised as the httpx exception the proxy maps to its 502 and 504 answers."""

import asyncio
import ssl

import httpx
import pytest

from proxy import upstream
from tests.fake_upstream import self_signed_certificate

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)


class Server:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request ``ok`` (or runs ``handler``
    for each connection), counting the connections it accepted."""

    def __init__(self, handler=None, *, tls: ssl.SSLContext | None = None):
        self.handler, self.tls, self.connections = handler, tls, 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader, writer):
        self.connections += 1
        try:
            if self.handler is not None:
                return await self.handler(reader, writer)
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(v) for k, v in _headers(head) if k == b"content-length"), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _headers(head: bytes):
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            yield name.strip().lower(), value.strip()


async def test_the_shared_client_is_one_per_loop_on_the_aiohttp_transport():
    client = upstream.client()
    assert upstream.client() is client
    assert isinstance(upstream._shared()[1], upstream.AiohttpTransport)
    await upstream.close()
    assert client.is_closed and upstream.client() is not client
    await upstream.close()


async def test_proxied_calls_reuse_connections_and_never_replay_an_upstreams_cookies(settings):
    seen = []

    async def remember(reader, writer):
        while head := await reader.readuntil(b"\r\n\r\n"):
            headers = dict(_headers(head))
            seen.append(headers)
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
            writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: __cf_bm=abc; Path=/\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def call():
        async with upstream.stream("chat/completions", b"{}") as response:
            return await response.aread()

    async with Server(handler=remember) as server:
        settings.UPSTREAM_BASE_URL = server.url.rstrip("/")
        try:
            assert await asyncio.wait_for(asyncio.gather(*(call() for _ in range(4))), 10) == [b"ok"] * 4
            for _ in range(3):
                assert await asyncio.wait_for(call(), 10) == b"ok"
        finally:
            await upstream.close()
    assert server.connections <= 4  # the three later calls reused pooled connections
    assert len(seen) == 7 and not any(b"cookie" in headers for headers in seen)
    assert all(headers[b"accept-encoding"] == b"identity" for headers in seen)


async def test_it_speaks_tls_to_a_trusted_certificate_and_refuses_any_other(tmp_path):
    cert, key = self_signed_certificate(str(tmp_path))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    async with Server(tls=tls) as server:
        trusted = ssl.create_default_context(cafile=cert)
        async with httpx.AsyncClient(transport=upstream.AiohttpTransport(LIMITS, verify=trusted)) as client:
            replies = [await asyncio.wait_for(client.get(server.url), 10) for _ in range(3)]
            assert [r.text for r in replies] == ["ok"] * 3
        assert server.connections == 1  # one handshake, then the same connection
        async with httpx.AsyncClient(transport=upstream.AiohttpTransport(LIMITS)) as client:  # public CAs only
            with pytest.raises(httpx.ConnectError):
                await asyncio.wait_for(client.get(server.url), 10)


async def test_failures_raise_the_httpx_exceptions_the_proxy_maps():
    async def silent(reader, writer):
        await reader.read()

    async def cut_mid_body(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async def hang_up(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with httpx.AsyncClient(transport=upstream.AiohttpTransport(LIMITS)) as client:
        async with Server(handler=silent) as server:
            with pytest.raises(httpx.ReadTimeout):
                await asyncio.wait_for(client.get(server.url, timeout=httpx.Timeout(5, read=0.2)), 10)
        async with Server(handler=cut_mid_body) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await asyncio.wait_for(client.get(server.url), 10)
        async with Server(handler=hang_up) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await asyncio.wait_for(client.get(server.url), 10)
        with pytest.raises(httpx.ConnectError):
            await asyncio.wait_for(client.get(f"http://127.0.0.1:{_port_nobody_listens_on()}/"), 10)


async def test_a_body_left_unread_closes_its_connection_and_one_read_to_the_end_is_reused():
    """Closing a response early is how a client's departure cancels the upstream generation."""
    closed = asyncio.Event()
    written = []  # chunks written to the current connection before it closed

    async def stream_slowly(reader, writer):
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                written.clear()
                for _ in range(50):
                    writer.write(b"5\r\nhello\r\n")
                    await writer.drain()
                    written.append(1)
                    await asyncio.sleep(0.02)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            closed.set()
            raise

    async with Server(handler=stream_slowly) as server:
        transport = upstream.AiohttpTransport(LIMITS)
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("GET", server.url) as response:
                first = await anext(response.aiter_raw())
            assert first.startswith(b"hello")
            await asyncio.wait_for(closed.wait(), 5)
            assert len(written) < 50  # cut off by the client leaving, not ended by the answer
            assert (await asyncio.wait_for(client.get(server.url), 10)).text == "hello" * 50
            assert (await asyncio.wait_for(client.get(server.url), 10)).text == "hello" * 50
        assert server.connections == 2  # the cut one, then one kept alive for both whole answers


def _port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
