"""
A helper program for the end-to-end resolver tests and the latency
measurement, run inside the test namespaces (not part of Shifter):

    tcp_peer.py echo PORT
        an echo server on [::]:PORT (IPv4 and IPv6)
    tcp_peer.py burst HOST PORT COUNT TIMEOUT
        open COUNT connections at once, send each a line, expect it back;
        print "ok N failed M" and the first few errors
    tcp_peer.py latency HOST PORT COUNT [split]
        COUNT connections one after another, each timed from the start of
        connect() to the first byte of the echo; print the sorted times (s),
        or with split each connection's CONNECT/FIRST (connect() returned,
        first byte), in the order made
    tcp_peer.py outcomes TIMEOUT HOST PORT COUNT [HOST PORT COUNT ...]
        open COUNT connections to each HOST PORT, all at once, each echoing
        a line if it connects; print one line per destination:
        "HOST PORT ok N refused N timeout N error N slowest S", S the
        longest any outcome took (s), then the first few errors
    tcp_peer.py syns HOST PORT COUNT
        send COUNT bare SYNs from random ports with a raw socket (needs
        CAP_NET_RAW; IPv4): handshakes that are never completed
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
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


def latency(host: str, port: int, count: int, split: bool = False) -> None:
    times = []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        started = time.perf_counter()
        sock.connect((host, port))
        connected = time.perf_counter() - started
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise SystemExit("no echo")
        times.append((time.perf_counter() - started, connected))
        sock.close()
    if split:
        print(" ".join(f"{c:.6f}/{t:.6f}" for t, c in times))
    else:
        print(" ".join(f"{t:.6f}" for t, _ in sorted(times)))


async def outcome(host: str, port: int, n: int, timeout: float) -> tuple[str, float, str]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(one(host, port, n), timeout)
        result, detail = "ok", ""
    except ConnectionRefusedError:
        result, detail = "refused", ""
    except asyncio.TimeoutError:
        result, detail = "timeout", ""
    except Exception as e:
        result, detail = "error", repr(e)
    return result, time.perf_counter() - started, detail


async def outcomes(timeout: float, targets: list[tuple[str, int, int]]) -> None:
    tasks = [[asyncio.create_task(outcome(host, port, n, timeout)) for n in range(count)]
             for host, port, count in targets]
    errors = []
    for (host, port, _), group in zip(targets, tasks):
        results = await asyncio.gather(*group)
        counts = {kind: sum(1 for r, _, _ in results if r == kind) for kind in ("ok", "refused", "timeout", "error")}
        slowest = max(t for _, t, _ in results)
        print(f"{host} {port} " + " ".join(f"{k} {v}" for k, v in counts.items()) + f" slowest {slowest:.3f}")
        errors += [detail for r, _, detail in results if r == "error"]
    for error in errors[:5]:
        print(f"error: {error}")


def internetChecksum(data: bytes) -> int:
    """
    The one's-complement checksum of IP and TCP headers (RFC 1071).
    """
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syns(host: str, port: int, count: int) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((host, port))
    source = probe.getsockname()[0]
    probe.close()
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    ports = random.sample(range(20000, 30000), count)
    for sourcePort in ports:
        header = struct.pack("!HHIIBBHHH", sourcePort, port, random.getrandbits(32), 0, 0x50, 0x02, 64240, 0, 0)
        pseudo = socket.inet_aton(source) + socket.inet_aton(host) + struct.pack("!BBH", 0, 6, len(header))
        header = header[:16] + struct.pack("!H", internetChecksum(pseudo + header)) + header[18:]
        raw.sendto(header, (host, 0))
    raw.close()
    print(f"sent {count}")


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "echo":
        asyncio.run(echo(int(argv[1])))
    elif mode == "burst":
        asyncio.run(burst(argv[1], int(argv[2]), int(argv[3]), float(argv[4])))
    elif mode == "latency":
        latency(argv[1], int(argv[2]), int(argv[3]), argv[4:5] == ["split"])
    elif mode == "outcomes":
        rest = argv[2:]
        targets = [(rest[i], int(rest[i + 1]), int(rest[i + 2])) for i in range(0, len(rest), 3)]
        asyncio.run(outcomes(float(argv[1]), targets))
    elif mode == "syns":
        syns(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
