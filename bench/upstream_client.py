"""What one upstream call costs the proxy's process in CPU: its httpx transport over aiohttp, against
httpx's own (httpcore and h11), over plain HTTP and TLS.

    .venv/bin/python bench/upstream_client.py [--requests 4000] [--conc 16] [--rounds 3]

A local server (a subprocess on uvloop, HTTP/1.1 keep-alive; for TLS a throwaway self-signed
certificate) answers every ``POST`` with a small OpenRouter-shaped JSON body at once. In this
process, on uvloop as the server runs, ``--conc`` tasks send requests back to back through the
shared transport exactly as ``proxy.upstream.stream`` does (request built, sent, body read,
response closed), after a warm-up on the same connections. Printed per transport and protocol:
this process's CPU time per request (best of ``--rounds``, the figure that matters: it is CPU
the proxy's event loop cannot spend on anything else) and the requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

BODY = json.dumps(
    {
        "id": "gen-bench",
        "object": "chat.completion",
        "model": "openai/gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Pong."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14, "cost": 0.0000030},
    }
).encode()
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
REQUEST = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}).encode()


def serve(port: int, cert: str | None, key: str | None) -> None:
    import uvloop

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    async def main() -> None:
        context = None
        if cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        server = await asyncio.start_server(connection, "127.0.0.1", port, ssl=context, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def ours(limits, context):
    from proxy import upstream

    return upstream.AiohttpTransport(limits, verify=context)


def httpx_default(limits, context):
    import httpx

    return httpx.AsyncHTTPTransport(limits=limits, verify=context, trust_env=False)


TRANSPORTS = {"aiohttp (ours)": ours, "httpcore (httpx's)": httpx_default}


async def measure(url: str, make_transport, cafile: str | None, requests: int, conc: int) -> tuple[float, float]:
    """(µs of this process's CPU per request, requests per second) through one transport."""
    import httpx

    from proxy import upstream

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=30)
    transport = make_transport(limits, ssl.create_default_context(cafile=cafile) if cafile else upstream.verify())
    target, timeout = httpx.URL(url), httpx.Timeout(10).as_dict()

    async def one() -> None:
        request = httpx.Request(
            "POST", target, headers=upstream.headers(), content=REQUEST, extensions={"timeout": timeout}
        )
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(worker(20) for _ in range(conc)))  # connections opened, code warm
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(requests // conc) for _ in range(conc)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await transport.aclose()
    done = requests // conc * conc
    return cpu / done * 1e6, done / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="timed requests per run (default 4000)")
    parser.add_argument("--conc", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per row; the best is printed (default 3)")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, cert, key = args.serve
        return serve(int(port), cert if cert != "-" else None, key if key != "-" else None)

    import django

    django.setup()
    import uvloop

    from tests.fake_upstream import self_signed_certificate

    print(f"one upstream call through the proxy's transport; {args.conc} in flight, CPU of this process")
    with tempfile.TemporaryDirectory() as directory:
        cert, key = self_signed_certificate(directory)
        for scheme, port in (("http", 18431), ("https", 18432)):
            tls = scheme == "https"
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), cert if tls else "-", key if tls else "-"]
            )
            try:
                time.sleep(1.0)
                for label, make_transport in TRANSPORTS.items():
                    runs = [
                        uvloop.run(
                            measure(
                                f"{scheme}://127.0.0.1:{port}/v1/chat/completions",
                                make_transport,
                                cert if tls else None,
                                args.requests,
                                args.conc,
                            )
                        )
                        for _ in range(args.rounds)
                    ]
                    cpu, rate = min(runs)
                    print(f"{scheme:5s}  {label:20s} {cpu:6.0f} µs CPU per request   {rate:6.0f} req/s", flush=True)
            finally:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
