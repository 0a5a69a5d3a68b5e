"""
The C{shifter} command (L{shifter.admin.command}): C{run}, C{check} and the
tools; the version; errors of one line naming the option, on standard
error, for C{twistd shifter}, C{shifter run} and C{shifter check}; CA files
and bundles; the example configuration (C{examples/shifter.toml}) kept
complete; and C{shifter check} fuzzed with random arguments and random
TOML, which must never end in a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis import given

from twisted.internet.ssl import KeyPair
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import shifter
from shifter.admin.command import check, main
from shifter.service.config import GATEWAY_KEYS, _PROXY_KEYS, _RULE_KEYS, loadConfig, optionKinds
from shifter.service.tap import Options
from shifter.upstream.proxy import readTrustRoot
from tests.test_fuzz import fuzz

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLE = PROJECT / "examples" / "shifter.toml"
TWISTD = str(Path(sys.executable).parent / "twistd")
ENV = dict(os.environ, PYTHONPATH=str(PROJECT))


def command(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=ENV, capture_output=True, text=True, timeout=120, cwd=str(PROJECT))


def shifterCommand(*arguments: str) -> subprocess.CompletedProcess:
    return command(sys.executable, "-m", "shifter", *arguments)


def certificatePEM(name: str) -> bytes:
    return KeyPair.generate(size=2048).selfSignedCert(1, commonName=name).dumpPEM()


class CommandTests(SynchronousTestCase):
    """
    C{python -m shifter} (what the C{shifter} console script runs), as a
    process.
    """

    def test_version(self) -> None:
        """
        C{shifter --version} and C{twistd shifter --version} print
        Shifter's version, not Twisted's alone.
        """
        for result in (shifterCommand("--version"), command(TWISTD, "shifter", "--version"),
                       shifterCommand("run", "--version")):
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertTrue(result.stdout.startswith(f"Shifter {shifter.__version__} (Twisted "), result.stdout)

    def test_usage(self) -> None:
        """
        No command, or an unknown one: the commands named on standard
        error, exit status 1; C{--help}: on standard output, status 0.
        """
        bare, unknown, helped = shifterCommand(), shifterCommand("serve"), shifterCommand("--help")
        self.assertEqual((bare.returncode, bare.stdout), (1, ""))
        self.assertIn("check", bare.stderr)
        self.assertEqual(unknown.returncode, 1)
        self.assertEqual(unknown.stderr.splitlines()[0], "shifter: unknown command 'serve'")
        self.assertEqual(helped.returncode, 0)
        self.assertIn("doctor", helped.stdout)

    def test_tools(self) -> None:
        """
        C{shifter rules|ctl|doctor|kmod} are the tools of the same name.
        """
        for tool, option in (("rules", "--lan-interface"), ("ctl", "--control"), ("doctor", "--check-target"),
                             ("kmod", "set-ports")):
            result = shifterCommand(tool, "--help")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(option, result.stdout, tool)
            self.assertTrue(result.stdout.startswith(f"usage: shifter {tool} "), result.stdout)

    def test_wrongOption(self) -> None:
        """
        A wrong option to C{twistd shifter}, C{shifter run} or C{shifter
        check}: the error naming it and one hint, on standard error, exit
        status 1, nothing on standard output (not the whole C{--help}).
        """
        for name, run in (("twistd shifter", (TWISTD, "shifter")),
                          ("shifter run", (sys.executable, "-m", "shifter", "run")),
                          ("shifter check", (sys.executable, "-m", "shifter", "check"))):
            for arguments, error in ((["--bogus"], "option --bogus not recognized"),
                                     (["--proxy", "127.0.0.1:3128", "--mark", "xyz"],
                                      "--mark: expected a whole number, got 'xyz'"),
                                     (["--proxy", "127.0.0.1:3128", "--idle-timeout"],
                                      "option --idle-timeout requires argument")):
                result = command(*run, *arguments)
                self.assertEqual(
                    (result.returncode, result.stdout, result.stderr),
                    (1, "", f"{name}: {error}\nTry '{name} --help' for the options.\n"),
                )

    def test_checkGood(self) -> None:
        """
        C{shifter check} on a good file: one line on standard output, exit
        status 0; nothing bound (the file's port is taken, and a control
        socket is not made).
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        control = os.path.abspath(self.mktemp())
        config = Path(self.mktemp()).resolve()
        config.write_text(
            f'listen = "tcp:{taken.getsockname()[1]}:interface=127.0.0.1"\ncontrol = "unix:{control}"\n'
            'proxy = ["10.0.0.5:3128", "http://u:secret@10.0.0.6:3128"]\n'
        )
        result = shifterCommand("check", "--config", str(config))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(len(result.stdout.splitlines()), 1)
        self.assertIn("2 proxies (10.0.0.5:3128, 10.0.0.6:3128)", result.stdout)
        self.assertIn("resolver sockopt", result.stdout)
        self.assertNotIn("secret", result.stdout)
        self.assertFalse(os.path.exists(control))

    def test_checkBad(self) -> None:
        """
        C{shifter check} on a file with a mistake: the file, line and
        reason on standard error, exit status 1.
        """
        config = Path(self.mktemp()).resolve()
        config.write_text('proxy = ["10.0.0.5:3128"]\n\nidle-timeout = -1\n')
        result = shifterCommand("check", "--config", str(config))
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr.splitlines()[0],
                         f"shifter check: {config} line 3: idle-timeout: expected a number of seconds "
                         "(0 for off), got '-1'")


class OptionErrorTests(SynchronousTestCase):
    """
    Every option's wrong value is refused naming the option.
    """

    # A wrong value for each option that takes one.
    WRONG = {
        "config": "/nonexistent/shifter.toml",
        "control": "tcp:1234",
        "listen": "nonsense:1",
        "balance": "random",
        "proxy-failures": "0",
        "proxy-backoff": "-1",
        "probe-target": "localhost:443",
        "proxy-credentials": "/nonexistent/password",
        "proxy-ca": "/nonexistent/ca.pem",
        "pass-client": "everything",
        "connect-target": "url",
        "sniff-timeout": "xyz",
        "resolver": "magic",
        "queue-num": "70000",
        "queue-mark": "xyz",
        "hold-timeout": "0",
        "reject-mark": "xyz",
        "direct-mark": "xyz",
        "connect-timeout": "1e308",
        "handshake-timeout": "nan",
        "setup-timeout": "",
        "idle-timeout": "-5",
        "max-connections": "-1",
        "max-connections-per-client": "xyz",
        "drain-timeout": "xyz",
        "metrics": "nonsense:1",
        "workers": "0",
        "worker": "xyz",
        "relay": "teleport",
        "early-data": "maybe",
        "mark": "xyz",
        "proxy": "nonsense",
        "allow": "10.0.0.0/33",
        "allow-port": "0",
        "access-log": "/nonexistent/access.log",
        "access-log-format": "{nonsense}",
        "tunnel-id-header": "a b",
        "log-format": "xml",
        "proxy-keytab": "/nonexistent/gateway.keytab",
        "proxy-principal": " ",
        "pac": "ftp://wpad.example/wpad.dat",
        "pac-fallback": "somewhere",
        "pac-refresh": "-1",
        "pac-timeout": "xyz",
        "warm-connections": "lots",
        "warm-lifetime": "-1",
    }

    def test_everyOption(self) -> None:
        """
        Each option with a wrong value: a one-line error that names it (a
        file, by its name).
        """
        names = {spec.rstrip("=") for spec in Options().longOpt if spec.endswith("=")}
        self.assertEqual(names - set(self.WRONG), set(), "an option without a wrong value to try")
        for name, value in self.WRONG.items():
            arguments = [f"--{name}={value}"]
            if name != "proxy":
                arguments.append("--proxy=https://10.0.0.5:3128")
            options = Options()
            try:
                options.parseOptions(arguments)
            except usage.UsageError as e:
                message = str(e)
            else:
                self.fail(f"--{name} {value!r} accepted")
            self.assertNotIn("\n", message)
            self.assertIn(value if name == "config" else f"--{name}", message)

    def test_resolverSettings(self) -> None:
        """
        The resolver's own settings are checked whichever options come
        with them: C{shifter check} builds the resolver as the start does.
        """
        err = io.StringIO()
        status = check(["--proxy", "127.0.0.1:3128", "--resolver", "nfqueue", "--reject-mark", "0x100000000"],
                       io.StringIO(), err)
        self.assertEqual((status, err.getvalue().splitlines()[0]),
                         (1, "shifter check: --reject-mark: 0x100000000 does not fit in 32 bits"))

    def test_proxyCANotPEM(self) -> None:
        """
        C{--proxy-ca} a file that is not PEM: one line saying so.
        """
        path = Path(self.mktemp())
        path.write_text("not a certificate\n")
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--proxy", "https://10.0.0.5:3128", "--proxy-ca", str(path)]
        )
        self.assertEqual(str(error), f"--proxy-ca: the proxy CA file {str(path)!r} holds no PEM certificate "
                         "(-----BEGIN CERTIFICATE-----)")
        path.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--proxy", "https://10.0.0.5:3128", "--proxy-ca", str(path)]
        )
        self.assertIn("certificate 1 cannot be loaded", str(error))

    def test_proxyCANotApplicable(self) -> None:
        """
        C{--proxy-ca} with no C{https://} proxy (or a C{[[proxy]]}'s C{ca}
        on an C{http://} one) is refused as not applying, even for a file
        that does not exist.
        """
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--proxy", "10.0.0.5:3128", "--proxy-ca", "/nonexistent"]
        )
        self.assertIn("--proxy-ca: applies only to https:// proxies", str(error))
        config = Path(self.mktemp())
        config.write_text('[[proxy]]\naddress = "10.0.0.5:3128"\nca = "/nonexistent"\n')
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", str(config)])
        self.assertIn("line 1: proxy: ca applies only to an https:// proxy", str(error))

    def test_proxyCAForPac(self) -> None:
        """
        With C{--pac}, C{--proxy-ca} applies to the HTTPS proxies the script
        names, so it is taken (and read) without any https:// proxy given.
        """
        path = Path(self.mktemp())
        path.write_bytes(certificatePEM("PAC CA"))
        options = Options()
        options.parseOptions(["--pac", "http://192.0.2.5/proxy.pac", "--proxy-ca", str(path)])
        self.assertEqual(options["proxy-ca"], str(path))
        error = self.assertRaises(usage.UsageError, Options().parseOptions,
                                  ["--pac", "http://192.0.2.5/proxy.pac", "--proxy-ca", "/nonexistent"])
        self.assertIn("--proxy-ca:", str(error))

    def test_bundle(self) -> None:
        """
        Every certificate of a CA bundle is trusted, not the first alone.
        """
        first, second = certificatePEM("First CA"), certificatePEM("Second CA")
        path = Path(self.mktemp())
        path.write_bytes(b"# a bundle\n" + first + b"\n" + second)
        root = readTrustRoot(str(path))
        subjects = sorted(certificate.get_subject().CN for certificate in root._caCerts)  # type: ignore[attr-defined]
        self.assertEqual(subjects, ["First CA", "Second CA"])
        options = Options()
        options.parseOptions(["--proxy", "https://10.0.0.5:3128", "--proxy-ca", str(path)])


def uncommented(text: str) -> str:
    """
    The example file with its settings uncommented (C{#key = ...} and
    C{#[table]} lines; prose comments are C{# } with a space).
    """
    return "\n".join(line[1:] if re.match(r"#[a-z\[]", line) else line for line in text.splitlines()) + "\n"


class ExampleConfigTests(SynchronousTestCase):
    """
    C{examples/shifter.toml} holds every key the configuration file takes,
    each with its default, and cannot drift from the options.
    """

    def test_parses(self) -> None:
        """
        As shipped (every setting commented out), the file is good: with a
        proxy, C{shifter check} accepts it.
        """
        loadConfig(str(EXAMPLE), Options)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check(["--config", str(EXAMPLE), "--proxy", "127.0.0.1:3128"], out, err), 0, err.getvalue())

    def loaded(self) -> Any:
        path = Path(self.mktemp())
        path.write_text(uncommented(EXAMPLE.read_text()))
        return loadConfig(str(path), Options)

    def test_everyKey(self) -> None:
        """
        With its settings uncommented the file is still good, and it sets
        every option a file may set, every [[proxy]], [[rule]] and
        [gateway] key.
        """
        config = self.loaded()
        options = set(optionKinds(Options)) - {"proxy"}
        self.assertEqual(options - set(config.optionLines), set())
        self.assertTrue(config.proxies)
        text = uncommented(EXAMPLE.read_text())
        proxyTable = text.split("\n[[proxy]]\n", 1)[1].split("\n[[rule]]\n", 1)[0]
        ruleTables = text.split("\n[[rule]]\n", 1)[1].split("\n[gateway]\n", 1)[0]
        for key in _PROXY_KEYS:
            self.assertRegex(proxyTable, rf"(?m)^{re.escape(key)} = ", f"[[proxy]] {key}")
        for key in _RULE_KEYS:
            self.assertRegex(ruleTables, rf"(?m)^{re.escape(key)} = ", f"[[rule]] {key}")
        self.assertEqual(set(GATEWAY_KEYS) - set(config.gateway), set())
        self.assertEqual(len(config.rules), 3)

    def test_defaults(self) -> None:
        """
        Each option that has a default is shown with it.
        """
        config = self.loaded()
        defaults = Options()

        class Alone(Options):
            def postOptions(self) -> None:
                pass

        for name in optionKinds(Options):
            default = defaults.get(name)
            if default is None or default == [] or default == set():
                continue
            given = [argument for argument in config.arguments
                     if argument == f"--{name}" or argument.startswith(f"--{name}=")]
            parsed = Alone()
            parsed.parseOptions(given)
            self.assertEqual(parsed[name], default, name)


# What the fuzz draws from: for each option, values it takes and values
# it refuses, so that most command lines get past the first checks to the
# later ones; random names and values besides.
_ENDPOINTS = ["tcp:0", "tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:", "systemd:domain=INET:name=x",
              "systemd:domain=INET:index=7", "unix:/nonexistent/s", "tproxy:0", "nonsense:1", "tcp:", "tcp:x"]
_NUMBERS = ["1", "2", "10", "30.5", "0x10", "0x20000", "0", "-1", "1e308", "nan", "65536", "4294967296", "x"]
_POOLS: dict[str, list[str]] = {
    "listen": _ENDPOINTS,
    "metrics": _ENDPOINTS,
    "control": ["unix:/nonexistent/control", "unix:", "unix:" + "x" * 200, "tcp:1", "unix:/a\x00b"],
    "resolver": ["sockopt", "kmod", "conntrack", "nfqueue", "tproxy", "auto", "x"],
    "proxy": ["127.0.0.1:3128", "https://10.0.0.5:3128", "http://u:p@[::1]:3128", "tcp:host=a:port=1",
              "https://proxy.example:1?pass-client=proxy-v2", "http://a:99999", "[::1]:x", "x"],
    "connect-target": ["ip", "sni", "host", "auto", "x"],
    "balance": ["failover", "round-robin", "source-hash", "x"],
    "pass-client": ["none", "x-forwarded-for", "proxy-v1", "proxy-v2", "x"],
    "relay": ["auto", "splice", "twisted", "x"],
    "early-data": ["send", "wait", "x"],
    "proxy-ca": ["/dev/null", "/nonexistent", "/etc/ssl/certs/ca-certificates.crt", "/etc/hostname"],
    "proxy-credentials": ["/dev/null", "/etc/hostname", "/nonexistent"],
    "config": ["/dev/null", "/nonexistent", "/etc/hostname"],
    "probe-target": ["example.com:443", "[::1]:80", "localhost:1", "[2001:db8::1]:443", "x"],
    "allow": ["10.0.0.0/8", "::/0", "10.0.0.1/33", "x"],
    "allow-port": ["80,443", "0", "65535", "x"],
    "queue-num": ["0", "65535", "65536"],
    "queue-mark": ["0", "0x10000", "0x100000000"],
    "reject-mark": ["0x20000", "0", "0x100000000", "0x10000"],
    "direct-mark": ["0x40000", "0", "0x100000000", "0x20000"],
}
_NAMES = sorted(optionKinds(Options)) + ["config", "help", "version", "bogus"]
_VALUES = sorted({value for pool in _POOLS.values() for value in pool} | set(_NUMBERS))


@st.composite
def optionValue(draw: st.DrawFn, name: str) -> str:
    pool = _POOLS.get(name, _NUMBERS)
    return draw(st.one_of(*[st.sampled_from(pool)] * 5, st.text(max_size=20)))


@st.composite
def arguments(draw: st.DrawFn) -> list[str]:
    # Mostly with a proxy, so that the checks after the first get their
    # turn.
    argv: list[str] = ["--proxy", draw(st.sampled_from(_POOLS["proxy"][:3]))] if draw(st.integers(0, 7)) else []
    names = st.one_of(*[st.sampled_from(sorted(_POOLS))] * 3, *[st.sampled_from(_NAMES)] * 2,
                      st.text(min_size=1, max_size=12))
    # Options that mean something, each with a value from its pool...
    for name in draw(st.lists(st.sampled_from(sorted(_POOLS)), unique=True, max_size=4)):
        argv += [f"--{name}", draw(st.sampled_from(_POOLS[name]))]
    # ...and anything at all.
    for _ in range(draw(st.integers(0, 3))):
        name = draw(names)
        value = draw(optionValue(name))
        form = draw(st.integers(0, 19))
        if form < 9:
            argv.append(f"--{name}={value}")
        elif form < 18:
            argv += [f"--{name}", value]
        elif form == 18:
            argv.append(f"--{name}")
        else:
            argv.append(value)
    return argv


_scalars = (
    st.sampled_from(_VALUES) | st.text(max_size=30) | st.booleans()
    | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True)
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(list(_PROXY_KEYS + _RULE_KEYS + GATEWAY_KEYS)) | st.text(min_size=1, max_size=8),
        children, max_size=4),
    max_leaves=12,
)
_KEYS = st.sampled_from(sorted(optionKinds(Options)) + ["proxy", "rule", "gateway"]) | st.text(min_size=1, max_size=12)


def _toml(value: Any) -> str:
    """
    C{value} as a TOML value (inline tables and arrays).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{_toml(str(key))} = {_toml(item)}" for key, item in value.items()) + "}"


_TABLE_VALUES = st.sampled_from([
    "x", "", "0x10", "0", 5, 0, -1, 2**32, True, False, 1.5, "default", ["a", "b"], [], "/nonexistent", "/dev/null",
    "10.0.0.0/8", "::/0", "10.0.0.1/33", 443, "8000-8100", "9-1", "example.com", ".example.org", "ip", "name",
    "proxy-v2", "lan0", [80, 443], [0], "https://10.0.0.5:3128", "127.0.0.1:3128", {"a": 1},
])


@st.composite
def tables(draw: st.DrawFn, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: draw(_TABLE_VALUES) for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=5))}


@st.composite
def documents(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.text(max_size=200))
    table = draw(st.dictionaries(_KEYS, _values, max_size=6))
    for name in draw(st.lists(st.sampled_from(sorted(optionKinds(Options))), max_size=4)):
        table[name] = draw(optionValue(name) | st.integers(-2, 70000) | st.lists(optionValue(name), max_size=3))
    # Tables that mean something, with values that may.
    if draw(st.booleans()):
        table["proxy"] = [{"address": draw(st.sampled_from(_POOLS["proxy"])), **draw(tables(_PROXY_KEYS))}
                          for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        table["rule"] = [draw(tables(_RULE_KEYS)) for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        table["gateway"] = draw(tables(GATEWAY_KEYS))
    text = "".join(f"{_toml(key)} = {_toml(value)}\n" for key, value in table.items())
    if kind == 1 and text:
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(max_size=10)) + text[cut:]
    return text


class CheckFuzzTests(SynchronousTestCase):
    """
    C{shifter check}, in this process, on random arguments and random TOML
    files: every outcome is exit status 0 or 1 (or the exit of C{--help}
    and C{--version}), never an exception.
    """

    def checked(self, argv: list[str]) -> None:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = check(argv, out, err)
        except SystemExit as e:
            self.assertIn(e.code, (0, None), f"{argv!r}: {err.getvalue()}")
            return
        self.assertIn(status, (0, 1))
        text = (err if status else out).getvalue()
        self.assertEqual(text.count("\n"), 2 if status else 1, f"{argv!r}: {text!r}")
        self.assertTrue(all(line.isprintable() for line in text.splitlines()), f"{argv!r}: {text!r}")

    @fuzz(1000)
    @given(arguments())
    def test_arguments(self, argv: list[str]) -> None:
        """
        Random command lines.
        """
        self.checked(argv)

    @fuzz(600)
    @given(documents(), arguments())
    def test_files(self, text: str, argv: list[str]) -> None:
        """
        Random TOML files (and random text), with random options beside.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        self.checked(["--config", path, *argv])
