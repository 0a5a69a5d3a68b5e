"""
What a hostile client costs the name sniffer (C{--connect-target sni}).

Real Shifters on a gateway in network namespaces (tests/gateway.py: client,
gateway with Squid on loopback, server with echo servers): one with
C{--connect-target sni} for port 443, one with C{--connect-target ip} for
port 8443, the same in every other way.  The hostile client sends a
ClientHello of about 5 KB as one-byte TLS records, one record per
C{send()} with C{TCP_NODELAY} (one per TCP segment, C{--gap} apart so that
each is a read of its own), then reads the echo of every byte through the
tunnel.  Measured:

  - Shifter's CPU time for one such connection, from the kernel's count
    of its on-CPU time (C{/proc/PID/task/*/schedstat}, nanoseconds) before
    the connection and after it has ended, one connection after another:
    with C{sni}, and with C{ip} (where no sniffing happens: what relaying
    the same thousands of segments costs), and the difference, which is
    the sniffer's share;
  - the sniffing alone, in this process: the hostile hello's records
    given to the sniffer one per read, as the tunnel of the source tree
    does it, in CPU time;
  - the first-byte latency of ordinary connections (a real one-record
    ClientHello, then the first byte of its echo) made one after another,
    alone and then while hostile clients keep connecting, and the
    difference.

Reports, never asserts.  Needs root, Squid and the project's venv:

    sudo .venv/bin/python bench/sniffer.py [--source DIR] [--hostile N]
        [--ordinary N] [--parallel N] [--size BYTES] [--gap SECONDS]

C{--source DIR} runs Shifter from another source tree (for example an
export of an earlier commit, to compare).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

HOSTILE_NAME = "hostile.example.test"
# The destination port redirected to the Shifter that does not sniff.
IP_PORT = 8443
ORDINARY_NAME = "ordinary.example.test"
# A reserved (GREASE) extension type: OpenSSL may already send padding (21).
_FILLER_EXTENSION = 0x0A0A


# ---------------------------------------------------------------------------
# The clients (run inside the client namespace: this file, by subcommand)
# ---------------------------------------------------------------------------


def clientHello(name: str, size: int = 0) -> bytes:
    """
    A real ClientHello handshake message for C{name}, grown to at least
    C{size} bytes with an extension of a reserved type.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    connection = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        pass
    records = outgoing.read()
    message = bytearray()
    pos = 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        message += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    grow = size - len(message) - 4
    if grow > 0:
        # The extensions block is last: lengthen it and the message.
        message += _FILLER_EXTENSION.to_bytes(2, "big") + grow.to_bytes(2, "big") + bytes(grow)
        body = 4 + 2 + 32
        body += 1 + message[body]
        body += 2 + int.from_bytes(message[body : body + 2], "big")
        body += 1 + message[body]
        extensions = int.from_bytes(message[body : body + 2], "big") + 4 + grow
        message[body : body + 2] = extensions.to_bytes(2, "big")
        message[1:4] = (len(message) - 4).to_bytes(3, "big")
    return bytes(message)


def _recvAll(sock: socket.socket, count: int) -> int:
    got = 0
    while got < count:
        data = sock.recv(65536)
        if not data:
            break
        got += len(data)
    return got


def hostileOnce(host: str, port: int, message: bytes, gap: float) -> tuple[float, bool]:
    """
    One hostile connection: the hello in one-byte records, one per segment,
    C{gap} seconds apart (so that each is a read of its own for Shifter);
    then the echo of all of it.

    @return: seconds taken, and whether every byte came back.
    """
    started = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=60)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in message:
            sock.send(b"\x16\x03\x01\x00\x01" + bytes([byte]))
            if gap:
                time.sleep(gap)
        complete = _recvAll(sock, 6 * len(message)) == 6 * len(message)
    except OSError:
        complete = False
    finally:
        sock.close()
    return time.perf_counter() - started, complete


def ordinaryOnce(host: str, port: int, records: bytes) -> float:
    """
    One ordinary connection: connect, send the hello in one record, wait
    for the first byte of its echo.

    @return: seconds from the start of connect() to that byte.
    """
    started = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=30)
    try:
        sock.sendall(records)
        if not sock.recv(1):
            raise OSError("closed without an answer")
        return time.perf_counter() - started
    finally:
        sock.close()


def clientMain(argv: list[str]) -> None:
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "hostile":
        message = clientHello(HOSTILE_NAME, int(argv[3]))
        seconds, complete = hostileOnce(host, port, message, float(argv[4]))
        print(json.dumps({"seconds": seconds, "complete": complete, "message": len(message)}))
    elif mode == "hostile-loop":
        size, gap, parallel, stopFile = int(argv[3]), float(argv[4]), int(argv[5]), argv[6]
        message = clientHello(HOSTILE_NAME, size)
        done = []

        def loop() -> None:
            while not os.path.exists(stopFile):
                done.append(hostileOnce(host, port, message, gap))

        threads = [threading.Thread(target=loop) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps({"connections": len(done), "complete": sum(c for _, c in done)}))
    elif mode == "ordinary":
        count = int(argv[3])
        message = clientHello(ORDINARY_NAME)
        records = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
        ordinaryOnce(host, port, records)  # warm-up
        print(json.dumps([ordinaryOnce(host, port, records) for _ in range(count)]))
    else:
        raise SystemExit(f"unknown client mode {mode!r}")


# ---------------------------------------------------------------------------
# The measurement (run as root, outside the namespaces)
# ---------------------------------------------------------------------------


def cpuNanoseconds(pid: int) -> int:
    """
    The on-CPU time of every thread of process C{pid}, in nanoseconds.
    """
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with open(path) as f:
            total += int(f.read().split()[0])
    return total


def sniffOnly(size: int) -> dict[str, float]:
    """
    The CPU time of sniffing the hostile hello fed one record per read, as
    the tunnel of the Shifter found on the path does it: fed each read
    once (L{shifter.tunnel.sniff.NameSniffer}), or, in older trees, every byte so
    far parsed again at each read.
    """
    try:
        from shifter.tunnel import sniff
    except ImportError:  # a tree from before shifter/ had packages
        from shifter import sniff  # type: ignore[no-redef]

    message = clientHello(HOSTILE_NAME, size)
    records = [b"\x16\x03\x01\x00\x01" + bytes([byte]) for byte in message]
    results = {}
    if hasattr(sniff, "NameSniffer"):
        runs = {
            f"{len(records)} reads, as the tunnel feeds them (cap of "
            f"{sniff.MAX_CLIENT_HELLO_RECORDS} records)": lambda: sniff.NameSniffer("sni"),
            f"{len(records)} reads, with no record cap (all {len(records)} records parsed)":
                lambda: sniff.ServerNameSniffer(maxRecords=len(records)),
        }
        for label, make in runs.items():
            started = time.process_time()
            sniffer = make()
            for record in records:
                if sniffer.feed(record) is not None:
                    break
            results[label] = time.process_time() - started
    else:
        started = time.process_time()
        early: list[bytes] = []
        for record in records:
            early.append(record)
            if sniff.sniffTarget("sni", b"".join(early)) is not None:
                break
        results[f"{len(records)} reads, every byte so far parsed again at each read"] = (
            time.process_time() - started
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(PROJECT), help="the Shifter source tree to run")
    parser.add_argument("--hostile", type=int, default=5, help="hostile connections timed one by one")
    parser.add_argument("--ordinary", type=int, default=200, help="ordinary connections per phase")
    parser.add_argument("--parallel", type=int, default=2, help="hostile clients at once meanwhile")
    parser.add_argument("--size", type=int, default=5000, help="bytes of the hostile ClientHello")
    parser.add_argument("--gap", type=float, default=100e-6,
                        help="seconds between the hostile client's segments (default 100 us; 0 for none)")
    args = parser.parse_args()

    sys.path.insert(0, str(PROJECT))
    from tests.gateway import SERVER_V4, SHIFTER_PORT, SQUID_PORT, VENV_BIN, Gateway, Squid, waitFor

    here = str(Path(__file__).resolve())
    peer = str(PROJECT / "tests" / "tcp_peer.py")
    with tempfile.TemporaryDirectory(prefix="shifter-sniffer-") as tmp:
        directory = Path(tmp)
        for parent in [directory, *directory.parents]:
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        net = Gateway(directory)
        try:
            net.redirect(443)
            net.redirect(IP_PORT, toPort=SHIFTER_PORT + 1)
            hosts = directory / "hosts"
            hosts.write_text(f"{SERVER_V4} {HOSTILE_NAME} {ORDINARY_NAME}\n")
            squid = Squid(
                net.gateway, directory / "squid",
                extra=f"hosts_file {hosts}\nacl SSL_ports port {IP_PORT}\n",
            )
            squid.start()
            for port in (443, IP_PORT):
                net.server.start(sys.executable, peer, "echo", str(port), logTo=directory / f"echo-{port}.log")
                net.server.waitListening(port)
            env = dict(os.environ, PYTHONPATH=args.source)
            shifters = {}
            for target, port in (("sni", SHIFTER_PORT), ("ip", SHIFTER_PORT + 1)):
                log = directory / f"shifter-{target}.log"
                process = net.gateway.start(
                    str(VENV_BIN / "twistd"), "-n", "--pidfile=", f"--logfile={log}", "shifter",
                    "--listen", f"tcp:{port}", "--proxy", f"127.0.0.1:{SQUID_PORT}",
                    "--connect-target", target,
                    logTo=directory / f"shifter-{target}.out", env=env,
                )
                waitFor(lambda: process.poll() is not None or "accepting" in _text(log), 30, "Shifter")
                if process.poll() is not None:
                    raise SystemExit(f"Shifter did not start:\n{_text(log)}")
                shifters[target] = (process, log)
            shifter, log = shifters["sni"]

            def client(*argv: str, timeout: float = 600) -> object:
                out = net.client.run(sys.executable, here, "client", *argv, timeout=timeout)
                return json.loads(out.stdout)

            # 1. Shifter's CPU for one hostile connection, one at a time,
            # alternately with sni and with ip.
            costs: dict[str, list[float]] = {"sni": [], "ip": []}
            for _ in range(args.hostile):
                for target, port in (("sni", 443), ("ip", IP_PORT)):
                    process, targetLog = shifters[target]
                    ended = _ended(targetLog)
                    before = cpuNanoseconds(process.pid)
                    result = client("hostile", SERVER_V4, str(port), str(args.size), str(args.gap))
                    waitFor(lambda: _ended(targetLog) > ended, 30, "the tunnel's log line")
                    time.sleep(0.2)
                    costs[target].append((cpuNanoseconds(process.pid) - before) / 1e6)
                    print(f"hostile connection, --connect-target {target:3}: {costs[target][-1]:8.1f} ms "
                          f"of Shifter CPU, {result['seconds']:.3f} s, {result['message']} byte hello in "
                          f"{result['message']} records, echo "
                          f"{'complete' if result['complete'] else 'INCOMPLETE'}", flush=True)
            print(_lastLine(shifters["sni"][1], " closed ("))
            inProcess = json.loads(subprocess.run(
                [sys.executable, here, "sniff-only", str(args.size)],
                env=env, capture_output=True, text=True, check=True,
            ).stdout)

            # 2. Ordinary first-byte latency, alone.
            alone = client("ordinary", SERVER_V4, "443", str(args.ordinary))

            # 3. The same while hostile clients keep connecting.
            stop = directory / "stop-hostile"
            hostile = subprocess.Popen(
                ["ip", "netns", "exec", net.client.name, sys.executable, here, "client",
                 "hostile-loop", SERVER_V4, "443", str(args.size), str(args.gap), str(args.parallel),
                 str(stop)],
                stdout=subprocess.PIPE, text=True,
            )
            time.sleep(1.0)
            cpuBefore, wallBefore = cpuNanoseconds(shifter.pid), time.monotonic()
            meanwhile = client("ordinary", SERVER_V4, "443", str(args.ordinary))
            busy = (cpuNanoseconds(shifter.pid) - cpuBefore) / 1e9 / (time.monotonic() - wallBefore)
            stop.touch()
            loop = json.loads(hostile.communicate(timeout=600)[0])

            print(f"\nShifter source: {args.source}")
            print(f"hostile connection ({args.size} byte ClientHello, 1-byte records "
                  f"{args.gap * 1e6:g} us apart), Shifter CPU:")
            for target in ("sni", "ip"):
                spent = costs[target]
                print(f"  --connect-target {target:3}: median {statistics.median(spent):7.1f} ms "
                      f"(min {min(spent):.1f}, max {max(spent):.1f}, {len(spent)} connections)")
            print(f"  the sniffer's share (sni - ip, medians): "
                  f"{statistics.median(costs['sni']) - statistics.median(costs['ip']):+.1f} ms")
            print(f"the sniffing alone, in one process, one record per read as the tunnel feeds it:")
            for label, seconds in inProcess.items():
                print(f"  {label}: {seconds * 1e3:.2f} ms CPU")
            for label, times in (("alone", alone), (f"with {args.parallel} hostile clients", meanwhile)):
                q = statistics.quantiles(times, n=20)
                print(f"ordinary first byte, {label:24}: median {statistics.median(times) * 1e3:8.3f} ms, "
                      f"p95 {q[18] * 1e3:8.3f} ms ({len(times)} connections)")
            print(f"added first-byte latency: median "
                  f"{(statistics.median(meanwhile) - statistics.median(alone)) * 1e3:+.3f} ms, p95 "
                  f"{(statistics.quantiles(meanwhile, n=20)[18] - statistics.quantiles(alone, n=20)[18]) * 1e3:+.3f} ms")
            print(f"meanwhile: {loop['connections']} hostile connections "
                  f"({loop['complete']} echoed completely), Shifter busy {busy * 100:.0f}% of one CPU")
        finally:
            net.destroy()


def _lastLine(log: Path, fragment: str) -> str:
    """
    The last line of C{log} holding C{fragment}.
    """
    lines = [line for line in _text(log).splitlines() if fragment in line]
    return lines[-1] if lines else f"(no line with {fragment!r})"


def _ended(log: Path) -> int:
    """
    How many tunnels Shifter has logged as ended.
    """
    text = _text(log)
    return text.count(" closed (") + text.count(" failed: ")


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        clientMain(sys.argv[2:])
    elif sys.argv[1:2] == ["sniff-only"]:
        print(json.dumps(sniffOnly(int(sys.argv[2]))))
    else:
        main()
