"""
C{python -m shifter.ctl}: ask a running Shifter, through its control
socket (C{--control unix:PATH}), what goes through it, and tell it to
reload or drain::

    python -m shifter.ctl --control unix:/run/shifter/control tunnels
    python -m shifter.ctl --config /etc/shifter/shifter.toml proxies --json
    python -m shifter.ctl explain 192.168.1.20 203.0.113.7:443 www.example.com
    python -m shifter.ctl reload
    python -m shifter.ctl drain

Without C{--control}, the socket is the one the C{--config} file names,
else C{$SHIFTER_CONTROL}, else C{unix:/run/shifter/control}.  Exit status:
0 done, 1 Shifter refused (a reload with an error in the file), 2 no
answer.

This is a small command-line client, not part of the service: it uses a
plain blocking socket.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from typing import Any, Optional, Sequence, TextIO

from shifter.service.control import COMMANDS, controlPath

DEFAULT_CONTROL = "unix:/run/shifter/control"


class ControlError(Exception):
    """
    Shifter could not be asked: the message says why.
    """


def ask(path: str, command: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """
    Send one command, with C{fields} if it takes any, to the control socket
    at C{path}; return the answer.

    @raise ControlError: if there is no usable answer.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        try:
            connection.connect(path)
        except PermissionError:
            raise ControlError(
                f"cannot use {path}: permission denied (the control socket is for "
                "the user Shifter runs as, and root)"
            ) from None
        except OSError as e:
            raise ControlError(f"cannot reach Shifter at {path}: {e.strerror}") from None
        connection.sendall(json.dumps({"command": command, **fields}).encode() + b"\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    except socket.timeout:
        raise ControlError(f"no answer from {path} within {timeout:g} s") from None
    except OSError as e:
        raise ControlError(f"lost the connection to {path}: {e.strerror}") from None
    finally:
        connection.close()
    if not received:
        raise ControlError(f"{path} closed the connection without answering (not allowed?)")
    try:
        answer = json.loads(received)
    except ValueError:
        raise ControlError(f"{path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path} answered something that is not an object")
    return answer


def formatSize(count: int) -> str:
    """
    A byte count for people: C{"512 B"}, C{"1.5 KiB"}, C{"12.0 MiB"}.
    """
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def formatAge(seconds: float) -> str:
    """
    A duration for people: C{"4.2s"}, C{"5m03s"}, C{"2h10m"}.
    """
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """
    Rows in columns as wide as their widest cell, two spaces apart.
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def formatECHShare(counts: dict[str, int]) -> str:
    """
    The share of connections whose ClientHello offered Encrypted Client
    Hello (C{ech}, which may be GREASE, and C{inner}) among those whose
    first bytes were read since start, for people.
    """
    read = sum(counts.values())
    if not read:
        return "ECH: no client's first bytes read since start"
    offered = counts.get("ech", 0) + counts.get("inner", 0)
    others = ", ".join(f"{counts[k]} {k}" for k in ("grease", "unknown") if counts.get(k))
    return (f"ECH since start: {offered} of {read} connections read ({100 * offered / read:.1f} %)"
            + (f"; {others}" if others else ""))


def formatTunnels(tunnels: Sequence[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [
        (
            t["client"], t["destination"], t["connectTarget"] or "-", t["proxy"] or "-", t["state"],
            formatSize(t["bytesUp"]), formatSize(t["bytesDown"]), formatAge(t["age"]), t.get("ech") or "-",
            t.get("tunnelId") or "-",
        )
        for t in tunnels
    ]
    headers: tuple[str, ...] = ("CLIENT", "DESTINATION", "CONNECT", "PROXY", "STATE", "UP", "DOWN", "AGE", "ECH", "ID")
    if any(t.get("decision") for t in tunnels):
        # What decided (a rule, a PAC answer), where a policy named it.
        headers += ("DECIDED BY",)
        rows = [row + (t.get("decision") or "-",) for row, t in zip(rows, tunnels)]
    count = f"{len(tunnels)} connection{'' if len(tunnels) == 1 else 's'}"
    return (table(headers, rows) + "\n" + count) if rows else "no connections"


def formatProxies(proxies: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            p["proxy"], p.get("state") or ("up" if p["up"] else "down"), str(p["failures"]),
            ",".join(p.get("groups", ())), formatAuth(p), p.get("lastError") or "-",
        )
        for p in proxies
    ]
    return table(("PROXY", "STATE", "FAILURES", "GROUPS", "AUTH", "LAST ERROR"), rows)


def formatAuth(proxy: dict[str, Any]) -> str:
    """
    The scheme a proxy asked for and, with a keytab, how long the
    gateway's Kerberos ticket has left: C{"negotiate (ticket 9h58m)"},
    C{"none (no ticket)"}.
    """
    scheme = proxy.get("scheme") or "none"
    kerberos = proxy.get("kerberos")
    if kerberos is None:
        return scheme
    left = kerberos.get("expiresIn")
    return f"{scheme} (ticket {formatAge(left)})" if left else f"{scheme} (no ticket)"


def formatExplain(explained: dict[str, Any]) -> str:
    """
    C{explain}'s answer for people: one fact a line.
    """
    e = explained
    named = f" named {e['name']}" if e.get("name") else ""
    lines = [f"connection {e['client']} -> {e['destination']}{named}"]
    if e.get("rule") is not None:
        lines.append(f"rule:       the rule at line {e['rule']} matches")
    else:
        lines.append("rule:       none matches")
    pac = e.get("pac")
    if pac:
        lines.append(f"PAC asked:  FindProxyForURL({pac['url']!r}, {pac['host']!r})")
        if pac.get("answer") is not None:
            lines.append(f"PAC answer: {pac['answer']} ({'cached' if pac.get('cached') else 'fresh'})")
        if pac.get("error"):
            lines.append(f"PAC error:  {pac['error']}")
    lines.append(f"decided by: {e['decidedBy']}")
    for index, proxy in enumerate(e.get("proxies") or (), 1):
        usable = "" if proxy["usable"] else ", skipped"
        error = f" (last error: {proxy['lastError']})" if proxy.get("lastError") else ""
        lines.append(f"try {index}:      {proxy['proxy']}: {proxy['state']}{usable}{error}")
    if e.get("refused"):
        lines.append(f"refused:    {e['refused']}")
    elif e.get("connectTarget"):
        first = next((p for p in e["proxies"] if p["usable"]), None)
        if e.get("directAtSyn"):
            lines.append(f"connect:    DIRECT at the SYN (not through Shifter): forwarded to {e['destination']}")
        elif first is not None and first["state"] == "direct":
            lines.append(f"connect:    directly to {e['destination']}")
        else:
            lines.append(f"CONNECT:    {e['connectTarget']}")
    return "\n".join(lines)


def _explainFields(arguments: argparse.Namespace) -> dict[str, Any]:
    host, colon, port = arguments.destination.rpartition(":")
    if not colon or not port.isdigit():
        raise ControlError(f"explain: expected DESTINATION:PORT, got {arguments.destination!r}")
    return {"client": arguments.client, "destination": host.strip("[]"), "port": int(port), "name": arguments.name}


def _socketPath(arguments: argparse.Namespace) -> str:
    control = arguments.control
    if control is None and arguments.config is not None:
        # Only the control key: a file that Shifter would refuse (the
        # reason to come here, perhaps) still names its socket.
        try:
            with open(arguments.config, "rb") as f:
                control = tomllib.load(f).get("control")
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ControlError(f"cannot read {arguments.config}: {e}") from None
        if not isinstance(control, str):
            raise ControlError(f"{arguments.config} sets no control socket (control = \"unix:PATH\")")
    if control is None:
        control = os.environ.get("SHIFTER_CONTROL", DEFAULT_CONTROL)
    try:
        return controlPath(control)
    except ValueError as e:
        raise ControlError(f"--control: {e}") from None


def _parser(prog: str = "python -m shifter.ctl") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Ask a running Shifter through its control socket.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="unix:PATH",
                       help=f"the control socket (default: $SHIFTER_CONTROL or {DEFAULT_CONTROL})")
    where.add_argument("--config", metavar="FILE", help="Shifter's configuration file, for its control socket")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in [
        ("tunnels", "every connection: client, destination, CONNECT target, proxy, state, bytes, age, ECH, id; "
                    "and the share of ECH since start"),
        ("proxies", "each proxy: up, down, probing or on trial, failures in a row, last error, groups"),
        ("explain", "what Shifter would do with a connection: the rule or PAC answer, the proxies in order "
                    "with their health, the CONNECT target"),
        ("reload", "reload the configuration file (as SIGHUP does)"),
        ("drain", "stop accepting, let open tunnels finish, then stop (as SIGTERM does)"),
    ]:
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--json", action="store_true", help="the answer as JSON")
        if name == "explain":
            command.add_argument("client", metavar="CLIENT", help="the client's address")
            command.add_argument("destination", metavar="DESTINATION:PORT",
                                 help="the original destination, [IPV6]:PORT for IPv6")
            command.add_argument("name", metavar="NAME", nargs="?", help="the name the client sends (SNI, Host)")
    assert set(commands.choices) == set(COMMANDS)
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None,
         prog: str = "python -m shifter.ctl") -> int:
    """
    The C{python -m shifter.ctl} command.

    @return: the exit status.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    arguments = _parser(prog).parse_args(argv)
    try:
        fields = _explainFields(arguments) if arguments.command == "explain" else {}
        answer = ask(_socketPath(arguments), arguments.command, arguments.timeout, **fields)
    except ControlError as e:
        print(f"shifter.ctl: {e}", file=err)
        return 2
    if arguments.json:
        print(json.dumps(answer, indent=2), file=out)
        return 0 if answer.get("ok") else 1
    if not answer.get("ok"):
        print(f"shifter.ctl: {arguments.command}: {answer.get('error', 'refused')}", file=err)
        return 1
    if arguments.command == "tunnels":
        print(formatTunnels(answer["tunnels"]), file=out)
        if sum(answer.get("ech", {}).values()):  # said only once a client's first bytes were read
            print(formatECHShare(answer["ech"]), file=out)
    elif arguments.command == "proxies":
        print(formatProxies(answer["proxies"]), file=out)
    elif arguments.command == "explain":
        print(formatExplain(answer["explain"]), file=out)
    elif arguments.command == "reload":
        print(f"reloaded: {answer['changes']}", file=out)
    else:
        print(
            f"draining {answer['open']} connections for up to {answer['timeout']:g} s; "
            "Shifter stops once they have finished",
            file=out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
