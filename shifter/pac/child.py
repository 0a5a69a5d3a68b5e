"""
The PAC helper: a process of its own (C{python -m shifter.pac.child}) that
runs the site's PAC script, driven by L{shifter.pac.evaluator} over its
standard input and output.

Everything that can block or run away happens here, never in Shifter's
reactor: the JavaScript (a loop, an allocation without end), and the DNS
look-ups of C{dnsResolve}, C{dnsResolveEx} and C{isInNet}, which block
this process alone.  The parent bounds each call in time and kills the
process past it; C{RLIMIT_AS} bounds its memory, so an allocation without
end ends in an error or the process's death, never in the machine's swap.

The engine is dukpy (QuickJS inside since 0.6), chosen by measurement
against the other bindings on PyPI (a 20-line PAC with C{shExpMatch},
C{dnsDomainIs} and C{isInNet}, 2000 distinct hosts, one process each):

  - dukpy 0.6.0: 67 us median per call (a compile of the call's line and
    JSON for its arguments included), 1 MiB of memory per interpreter;
    maintained (released 2026-07); calls back into Python for the
    look-ups.
  - quickjs 1.19.4: 17 us, 0.7 MiB, but its last release is of 2023, and
    its own time limit refuses any call back into Python (so it could not
    bound a PAC that resolves names anyway).
  - mini-racer 0.14.1 (V8): 360 us, 54 MiB per interpreter, and V8
    reserves far more address space than an C{RLIMIT_AS} worth setting.
  - pacparser 1.5.3: 19 us, but one PAC per process held in global state,
    a SpiderMonkey of 2007 to parse hostile scripts with, and its own
    look-ups that cannot be replaced.

The per-call cost is far below the process round trip it rides on, so
dukpy's maintenance and isolation decide.

Frames, both ways: a 4-byte big-endian length, then a JSON object.
Requests: C{{"op": "load", "script": ..., "myIp": ...}} then any number of
C{{"op": "find", "url": ..., "host": ...}}.  Answers: C{{"ok": true,
"answer": ..., "addresses": {name: [address, ...]}}} (the addresses of the
proxies the answer names by host name, looked up here so that the parent
never has to), or C{{"ok": false, "error": "one line"}}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import socket
import struct
import sys
from typing import Any, BinaryIO, Optional

# The largest request read: a PAC script within the fetch limit, as JSON.
MAX_FRAME = 16 * 1024 * 1024
# The most proxy names one answer may have looked up.
MAX_NAMES = 8

_CALLBACKS = ("dnsResolve", "dnsResolveEx", "myIpAddress", "myIpAddressEx", "isInNetEx", "sortIpAddressList")


def readFrame(stream: BinaryIO) -> Optional[dict[str, Any]]:
    """
    The next request, or C{None} at the end of the input.
    """
    header = stream.read(4)
    if len(header) < 4:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME:
        raise ValueError(f"request of {length} bytes")
    body = stream.read(length)
    if len(body) < length:
        return None
    request = json.loads(body)
    if not isinstance(request, dict):
        raise ValueError("request is not an object")
    return request


def writeFrame(stream: BinaryIO, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def _oneLine(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line[:300]


def resolve(host: str) -> list[str]:
    """
    The addresses of C{host}, IPv4 ones first (a blocking look-up: this
    process is there for it).
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return []
    found: list[str] = []
    for family, _, _, _, address in infos:
        text = ipaddress.ip_address(str(address[0]).split("%", 1)[0]).compressed
        if text not in found:
            found.append(text)
    return sorted(found, key=lambda a: ":" in a)


def localAddress(toward: Optional[str]) -> str:
    """
    This machine's address toward C{toward} (the proxy's address): the
    source the kernel would choose, read from a UDP socket connected there
    (which sends nothing).
    """
    # With no proxy address to go by, the address of the default route
    # (toward a documentation address: connect() only asks the routing
    # table).
    for address in (toward, "192.0.2.1"):
        if not address:
            continue
        try:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((address, 9))
                return str(probe.getsockname()[0])
        except OSError:
            pass
    return "127.0.0.1"


class Script:
    """
    One PAC script in an interpreter, with the functions it may call.
    """

    def __init__(self, source: str, myIp: str) -> None:
        import dukpy  # type: ignore[import-untyped]

        from shifter.pac.functions import PAC_FUNCTIONS

        self.myIp = myIp
        self.interpreter = dukpy.JSInterpreter()
        shims = []
        for name in _CALLBACKS:
            self.interpreter.export_function("_shifter_py_" + name, getattr(self, name))
            shims.append(
                f"function _shifter_{name}(a, b) {{ return call_python('_shifter_py_{name}', a, b); }}\n"
            )
        self.interpreter.evaljs("".join(shims) + PAC_FUNCTIONS)
        self.interpreter.evaljs(source)
        if not self.interpreter.evaljs("typeof FindProxyForURL === 'function'"):
            raise ValueError("the script defines no function FindProxyForURL")

    def find(self, url: str, host: str) -> Any:
        return self.interpreter.evaljs("FindProxyForURL(dukpy.url, dukpy.host)", url=url, host=host)

    # What the JavaScript calls back.

    def dnsResolve(self, host: Any, _: Any = None) -> str:
        addresses = [a for a in resolve(str(host)) if ":" not in a]
        return addresses[0] if addresses else ""

    def dnsResolveEx(self, host: Any, _: Any = None) -> str:
        return ";".join(resolve(str(host)))

    def myIpAddress(self, *_: Any) -> str:
        return self.myIp if ":" not in self.myIp else "127.0.0.1"

    def myIpAddressEx(self, *_: Any) -> str:
        return self.myIp

    def isInNetEx(self, address: Any, prefix: Any) -> bool:
        try:
            network = ipaddress.ip_network(str(prefix), strict=False)
            text = str(address)
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                found = resolve(text)
                if not found:
                    return False
                ip = ipaddress.ip_address(found[0])
            return ip in network
        except ValueError:
            return False

    def sortIpAddressList(self, addresses: Any, _: Any = None) -> str:
        try:
            parsed = [ipaddress.ip_address(a.strip()) for a in str(addresses).split(";") if a.strip()]
        except ValueError:
            return ""
        parsed.sort(key=lambda ip: (ip.version == 4, ip.packed))
        return ";".join(ip.compressed for ip in parsed)


def answerFor(script: Script, url: str, host: str) -> dict[str, Any]:
    """
    Run C{FindProxyForURL}, and look up the proxy names its answer holds.
    """
    from shifter.pac.answer import PAC_DIRECT, AnswerError, parseAnswer

    try:
        answer = script.find(url, host)
    except Exception as e:
        return {"ok": False, "error": f"FindProxyForURL failed: {_oneLine(e)}"}
    try:
        choices = parseAnswer(answer)
    except AnswerError as e:
        return {"ok": False, "error": str(e)}
    addresses: dict[str, list[str]] = {}
    for choice in choices:
        if choice.kind != PAC_DIRECT and not choice.isAddress and choice.host not in addresses:
            if len(addresses) >= MAX_NAMES:
                break
            addresses[choice.host] = resolve(choice.host)
    return {"ok": True, "answer": answer, "addresses": addresses}


def dieWithParent() -> None:
    """
    Be killed when Shifter ends, however it ends (PR_SET_PDEATHSIG): a
    script looping when Shifter is killed never reads the end of its input.
    """
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)  # the parent ended before the request took effect


def serve(memory: int, stdin: BinaryIO, stdout: BinaryIO) -> int:
    import dukpy  # noqa: F401  (loaded before the memory limit)

    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    script: Optional[Script] = None
    while True:
        try:
            request = readFrame(stdin)
        except (ValueError, MemoryError) as e:
            writeFrame(stdout, {"ok": False, "error": f"bad request: {_oneLine(e)}"})
            return 1
        if request is None:
            return 0
        op = request.get("op")
        try:
            if op == "load":
                script = None
                script = Script(str(request.get("script", "")), localAddress(request.get("myIp")))
                writeFrame(stdout, {"ok": True})
            elif op == "find" and script is not None:
                writeFrame(stdout, answerFor(script, str(request.get("url")), str(request.get("host"))))
            else:
                writeFrame(stdout, {"ok": False, "error": f"unexpected request {op!r}"})
        except MemoryError:
            writeFrame(stdout, {"ok": False, "error": "the PAC script ran out of memory"})
            return 1
        except Exception as e:
            writeFrame(stdout, {"ok": False, "error": _oneLine(e)})


def main() -> int:
    memory = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    dieWithParent()
    # The parent reads frames from stdout: nothing else may write there.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return serve(memory, sys.stdin.buffer, stdout)


if __name__ == "__main__":
    sys.exit(main())
