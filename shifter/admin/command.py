"""
The C{shifter} command: C{shifter run} (Shifter in the foreground, as
C{twistd -n shifter}), C{shifter check} (a configuration checked as the
start checks it, with nothing opened or bound) and the tools
(C{shifter rules}, C{ctl}, C{doctor}, C{kmod}, also run as
C{python -m shifter.X}).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Optional, Sequence, TextIO

from zope.interface import implementer

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage

USAGE = """\
Usage: shifter COMMAND [OPTIONS]

Commands:
  run      Shifter in the foreground (as twistd -n shifter), logging to
           standard output: shifter run --config /etc/shifter/shifter.toml
  check    check a configuration as the start does, opening nothing:
           shifter check --config FILE [OPTIONS]; exit status 0 or 1
  rules    print the gateway's netfilter rules for a resolver
  ctl      talk to a running Shifter through its control socket
  doctor   check the gateway: rules, routes, the proxy, the module
  kmod     the kernel module's settings and table

shifter --version prints the version; shifter COMMAND --help a command's
options (those of run and check are the same).
"""

# The tools, by command: the module whose main(argv) runs each.
TOOLS = {
    "rules": "shifter.admin.rules",
    "ctl": "shifter.admin.ctl",
    "doctor": "shifter.admin.doctor",
    "kmod": "shifter.resolvers.kmod",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run the command that C{argv} (by default the process's arguments)
    names.

    @return: the exit status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments:
        sys.stderr.write(USAGE)
        return 1
    command, rest = arguments[0], arguments[1:]
    if command in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if command in ("--version", "-V", "version"):
        from shifter.service.tap import versionLine

        print(versionLine())
        return 0
    if command == "run":
        return run(rest)
    if command == "check":
        return check(rest)
    if command in TOOLS:
        tool: Callable[..., Any] = importlib.import_module(TOOLS[command]).main
        status = tool(rest, prog=f"shifter {command}")
        return status if isinstance(status, int) else 0
    sys.stderr.write(f"shifter: unknown command {command!r}\nTry 'shifter --help' for the commands.\n")
    return 1


@implementer(IServiceMaker, IPlugin)
class _ShifterMaker:
    """
    The C{twistd shifter} plugin, for twistd run from C{shifter run}: this
    installation's Shifter, whatever Twisted's plugin cache holds.
    """

    tapname = "shifter"
    description = "Relay netfilter-redirected connections through an HTTP proxy (CONNECT)."

    def options(self) -> usage.Options:
        from shifter.service.tap import Options

        options = Options()
        options.command = "shifter run"
        return options

    def makeService(self, options: usage.Options) -> IService:
        from shifter.service.tap import makeService

        return makeService(options)  # type: ignore[arg-type]


def run(arguments: Sequence[str]) -> int:
    """
    C{shifter run OPTIONS}: C{twistd --nodaemon --pidfile= --reactor
    shifter shifter OPTIONS} (L{shifter.service.reactor}), logging to
    standard output (the journal, under systemd).  A start that
    fails ends the process with status 1 (L{shifter.service.service}).
    """
    from twisted.scripts.twistd import ServerOptions, runApp

    class RunOptions(ServerOptions):  # type: ignore[misc]
        _getPlugins = staticmethod(lambda interface, package=None: [_ShifterMaker()])  # type: ignore[assignment]

    if "twisted.internet.reactor" not in sys.modules:
        from shifter.service.reactor import install

        install()
    config = RunOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", "shifter", *arguments])
    except usage.UsageError as e:
        from shifter.service.tap import usageFailure

        return usageFailure("shifter run", e)
    runApp(config)
    return 0


def check(arguments: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    C{shifter check [--config FILE] [OPTIONS]}: every check the start makes
    of the options, the file, the proxies, their credentials and CA files,
    with no port opened or bound and no resolver started.

    @return: 0 with one line saying what would run, or 1 with one line
        saying why it cannot.
    """
    from twisted.internet import reactor

    from shifter.resolvers.resolver import makeResolver
    from shifter.service.tap import Options, buildProxy, printable, resolverOptions, usageFailure

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = Options()
    options.command = "shifter check"
    try:
        options.parseOptions(list(arguments))
        proxies = [buildProxy(spec, options, reactor).description for spec in options.proxySpecs]
        # Built as the start builds it, not started: nothing is opened.
        makeResolver(options["resolver"], reactor, **resolverOptions(options))
    except (usage.UsageError, ValueError) as e:
        return usageFailure("shifter check", e, err)
    configFile = options.configFile
    rules = len(configFile.rules) if configFile is not None else 0
    out.write(
        f"shifter check: {printable(configFile.path) if configFile is not None else 'the command line'} is good: "
        f"listen {options['listen']}, resolver {options['resolver']}, "
        f"{len(proxies)} {'proxy' if len(proxies) == 1 else 'proxies'} ({', '.join(proxies)}), "
        f"{rules} {'rule' if rules == 1 else 'rules'}\n"
    )
    return 0
