"""
A helper program for the end-to-end resolver tests and the latency
measurement, run inside the test namespaces (not part of Shifter):

    tcp_peer.py echo PORT
        an echo server on [::]:PORT (IPv4 and IPv6)
    tcp_peer.py burst HOST PORT COUNT TIMEOUT
        open COUNT connections at once, send each a line, expect it back;
        print "ok N failed M" and the first few errors
    tcp_peer.py latency HOST PORT COUNT
        COUNT connections one after another, each timed from the start of
        connect() to the first byte of the echo; print the sorted times (s)
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time


async def echo(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    server = await asyncio.start_server(handle, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


async def one(host: str, port: int, n: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        line = f"connection {n}\n".encode()
        writer.write(line)
        await writer.drain()
        got = await reader.readexactly(len(line))
        if got != line:
            raise ValueError(f"echo {got!r} for {line!r}")
    finally:
        writer.close()


async def burst(host: str, port: int, count: int, timeout: float) -> None:
    tasks = [asyncio.create_task(asyncio.wait_for(one(host, port, n), timeout)) for n in range(count)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    print(f"ok {count - len(errors)} failed {len(errors)}")
    for error in errors[:5]:
        print(f"error: {error!r}")


def latency(host: str, port: int, count: int) -> None:
    times = []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        started = time.perf_counter()
        sock.connect((host, port))
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise SystemExit("no echo")
        times.append(time.perf_counter() - started)
        sock.close()
    print(" ".join(f"{t:.6f}" for t in sorted(times)))


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "echo":
        asyncio.run(echo(int(argv[1])))
    elif mode == "burst":
        asyncio.run(burst(argv[1], int(argv[2]), int(argv[3]), float(argv[4])))
    elif mode == "latency":
        latency(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
