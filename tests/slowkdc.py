"""
A KDC that answers late, for the tests (not part of Shifter): a relay on
127.0.0.1:PORT, UDP and TCP, that passes each request on to the real KDC
at once and holds its answer back DELAY seconds.

    slowkdc.py PORT KDC_PORT DELAY

It prints "asked T" when a request arrives and "answered T" when the
held answer is sent (T: seconds since the epoch), one line each.
"""

from __future__ import annotations

import asyncio
import sys
import time


def note(what: str) -> None:
    print(f"{what} {time.time():.3f}", flush=True)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, kdcPort: int, delay: float) -> None:
        self.kdcPort = kdcPort
        self.delay = delay
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, client) -> None:  # type: ignore[no-untyped-def]
        note("asked")
        asyncio.ensure_future(self.relay(data, client))

    async def relay(self, data: bytes, client) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        class Reply(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _) -> None:  # type: ignore[no-untyped-def]
                if not answer.done():
                    answer.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(Reply, remote_addr=("127.0.0.1", self.kdcPort))
        transport.sendto(data)
        try:
            reply = await asyncio.wait_for(answer, 10)
        finally:
            transport.close()
        await asyncio.sleep(self.delay)
        self.transport.sendto(reply, client)  # type: ignore[union-attr]
        note("answered")


async def _tcp(kdcPort: int, delay: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    note("asked")
    kdcReader, kdcWriter = await asyncio.open_connection("127.0.0.1", kdcPort)

    async def up() -> None:
        while data := await reader.read(65536):
            kdcWriter.write(data)
            await kdcWriter.drain()

    async def down() -> None:
        while data := await kdcReader.read(65536):
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            note("answered")
        writer.close()

    try:
        await asyncio.gather(up(), down())
    except OSError:
        pass
    finally:
        kdcWriter.close()
        writer.close()


async def main(port: int, kdcPort: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Udp(kdcPort, delay), local_addr=("127.0.0.1", port))
    server = await asyncio.start_server(lambda r, w: _tcp(kdcPort, delay, r, w), "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
