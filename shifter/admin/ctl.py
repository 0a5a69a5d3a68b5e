"""
C{python -m shifter.ctl}: ask a running Shifter, through its control
socket (C{--control unix:PATH}), what goes through it, and tell it to
reload or drain::

    python -m shifter.ctl --control unix:/run/shifter/control tunnels
    python -m shifter.ctl --config /etc/shifter/shifter.toml proxies --json
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


def ask(path: str, command: str, timeout: float = 30.0) -> dict[str, Any]:
    """
    Send one command to the control socket at C{path}; return the answer.

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
        connection.sendall(json.dumps({"command": command}).encode() + b"\n")
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


def formatTunnels(tunnels: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            t["client"], t["destination"], t["connectTarget"] or "-", t["proxy"] or "-", t["state"],
            formatSize(t["bytesUp"]), formatSize(t["bytesDown"]), formatAge(t["age"]),
            t.get("tunnelId") or "-",
        )
        for t in tunnels
    ]
    headers = ("CLIENT", "DESTINATION", "CONNECT", "PROXY", "STATE", "UP", "DOWN", "AGE", "ID")
    count = f"{len(tunnels)} connection{'' if len(tunnels) == 1 else 's'}"
    return (table(headers, rows) + "\n" + count) if rows else "no connections"


def formatProxies(proxies: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            p["proxy"], p.get("state") or ("up" if p["up"] else "down"), str(p["failures"]),
            ",".join(p.get("groups", ())), p.get("lastError") or "-",
        )
        for p in proxies
    ]
    return table(("PROXY", "STATE", "FAILURES", "GROUPS", "LAST ERROR"), rows)


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
        ("tunnels", "every connection: client, destination, CONNECT target, proxy, state, bytes, age, id"),
        ("proxies", "each proxy: up, down, probing or on trial, failures in a row, last error, groups"),
        ("reload", "reload the configuration file (as SIGHUP does)"),
        ("drain", "stop accepting, let open tunnels finish, then stop (as SIGTERM does)"),
    ]:
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--json", action="store_true", help="the answer as JSON")
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
        answer = ask(_socketPath(arguments), arguments.command, arguments.timeout)
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
    elif arguments.command == "proxies":
        print(formatProxies(answer["proxies"]), file=out)
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
