"""
The man pages C{shifter(8)} and C{shifter.toml(5)} and C{docs/reference.md},
generated from the definitions Shifter itself runs with: the options of
L{shifter.service.tap.Options} (their help and defaults), the keys of the
configuration file (L{shifter.service.config}), the access log's fields
(L{shifter.service.accesslog.FIELDS}), the metrics and the commands of
C{shifter}.  An option added there is documented here at once, so the
pages cannot drift from the program.  C{make man} runs
C{python -m shifter.admin.manpage docs}.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import shifter
from shifter.admin.command import USAGE
from shifter.admin.doctor import _parser as doctorParser
from shifter.service.accesslog import FIELDS
from shifter.service.config import _PROXY_KEYS, _RULE_KEYS, GATEWAY_KEYS, optionKinds
from shifter.service.tap import Options
from shifter.tunnel.metrics import TunnelStats

# Options that are not for the operator: internal (a worker's index), or
# answered by the command itself.
_HIDDEN = frozenset({"worker", "help", "version"})

# The page's example of a file (tests/test_manpage.py checks it as
# shifter check does).
EXAMPLE = """\
proxy = ["127.0.0.1:3128"]
connect-target = "sni"
idle-timeout = 600

[[rule]]
name = ".example.com"
refuse = "not from here"
"""

# What each key of the file's tables means.  A key added to config.py and
# not described here stops the generator (and so the no-drift test).
PROXY_KEY_HELP = {
    "address": "The proxy, in any form --proxy takes (HOST:PORT, http://, https://, socks5://, an endpoint string). Required.",
    "group": "The group (or list of groups) that rules send connections to. Default: default.",
    "credentials": "A file holding user:password for this proxy (--proxy-credentials for this proxy alone).",
    "ca": "The CA bundle for this https:// proxy (--proxy-ca for this proxy alone).",
    "mark": "The socket mark (1 to 0xffffffff) on connections to this proxy, for policy routing.",
    "pass-client": "What this proxy is told of each client, as --pass-client; not for socks5://.",
    "keytab": "The gateway's keytab for Negotiate to this proxy (--proxy-keytab for this proxy alone).",
    "principal": "The gateway's principal in that keytab (--proxy-principal for this proxy alone).",
}
RULE_KEY_HELP = {
    "client": "Client networks (one or a list); any of them matches.",
    "destination": "Original destination networks (one or a list).",
    "port": "Original destination ports: numbers or ranges such as \"8000-8999\".",
    "name": "Suffixes of the name read from the client's first bytes (TLS SNI or HTTP Host): example.com matches it and its subdomains, .example.com only subdomains. A connection with no name never matches.",
    "ech": "true: the ClientHello may hide its name behind Encrypted Client Hello; false: it does not.",
    "proxy": "The proxy group to send the connection to.",
    "connect-target": "ip (CONNECT to the original address) or name (to the name read, if any).",
    "refuse": "Refuse the connection, with this reason (logged and in the access log).",
    "direct": "true: Shifter connects to the original destination itself, through no proxy.",
}


class Option(NamedTuple):
    """
    One command-line option as the pages show it.

    @ivar name: its long name.
    @ivar short: its one-letter name, if any.
    @ivar value: whether it takes a value (else a flag).
    @ivar default: its default, in words (C{None}: none shown).
    @ivar help: its help, on one line.
    @ivar repeatable: it may be given more than once.
    """

    name: str
    short: Optional[str]
    value: bool
    default: Optional[str]
    help: str
    repeatable: bool


def _line(text: str) -> str:
    return " ".join(text.split())


def options() -> list[Option]:
    """
    Every option an operator gives, in the order of the definitions.
    """
    parsed = Options()
    kinds = optionKinds(Options)
    shorts = {long: short for short, long in parsed.synonyms.items() if len(short) == 1}
    coerceDocs: dict[str, str] = {}
    for spec in Options.optParameters:
        definition: list[Any] = list(spec)  # type: ignore[call-overload]
        if len(definition) > 4:
            coerceDocs[definition[0]] = getattr(definition[4], "coerceDoc", "")
    found = []
    for spec in parsed.longOpt:
        name = spec.rstrip("=")
        if name in _HIDDEN:
            continue
        value = spec.endswith("=")
        default = parsed.defaults.get(name)
        shown = None if not value or default is None else str(default)
        text = _line(parsed.docs.get(name) or "")
        extra = _line(coerceDocs.get(name) or "")
        if extra and extra not in text:
            text = f"{text} {extra}"
        found.append(Option(name, shorts.get(name), value, shown, text, name in kinds and kinds[name].repeatable))
    return found


def commands() -> list[tuple[str, str]]:
    """
    The commands of C{shifter}, with what each does, from its usage text.
    """
    found: list[tuple[str, str]] = []
    inCommands = False
    for text in USAGE.splitlines():
        if text == "Commands:":
            inCommands = True
        elif inCommands and text.startswith("  ") and not text.startswith("   "):
            name, _, rest = text.strip().partition(" ")
            found.append((name, _line(rest)))
        elif inCommands and text.startswith("   ") and found:
            found[-1] = (found[-1][0], found[-1][1] + " " + _line(text))
        elif inCommands and not text.strip():
            inCommands = False
    return found


class Metric(NamedTuple):
    name: str
    kind: str
    help: str
    labels: tuple[str, ...]


def metrics() -> list[Metric]:
    """
    The metrics C{--metrics} serves, read from the collectors themselves.
    """

    class NoPool:
        health: dict[object, object] = {}

    stats = TunnelStats()
    stats.collectFrom(lambda: 0, NoPool)
    found = [Metric("shifter_build_info", "info", "The Shifter that runs: its version label.", ("version",))]
    for family in stats.registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        labels = set(getattr(family, "_labelnames", ()))  # declared, even with no sample yet
        labels.update(label for sample in family.samples for label in sample.labels if label != "le")
        found.append(Metric(family.name + suffix, family.type, family.documentation, tuple(sorted(labels))))
    return found


def gatewayKeyHelp() -> dict[str, str]:
    """
    What each C{[gateway]} key means: the help of C{shifter doctor}'s
    option of the same name, which the key gives the default of.
    """
    helps = {action.dest.replace("_", "-"): action.help or "" for action in doctorParser()._actions}
    return {key: f"shifter doctor --{key}: {_line(helps[key])}." for key in GATEWAY_KEYS if helps.get(key)}


def _described(keys: Sequence[str], help: dict[str, str], table: str) -> list[tuple[str, str]]:
    missing = [key for key in keys if key not in help]
    if missing:
        raise KeyError(f"{table} keys with no description in shifter.admin.manpage: {', '.join(missing)}")
    return [(key, help[key]) for key in keys]


# roff


def roffText(text: str) -> str:
    """
    C{text} as roff running text: backslashes and hyphens escaped, and a
    line that would begin with a control character (. or ') guarded.
    """
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _roffOption(option: Option) -> Iterator[str]:
    head = f"\\fB\\-\\-{roffText(option.name)}\\fR"
    if option.short:
        head = f"\\fB\\-{option.short}\\fR, " + head
    if option.value:
        head += " \\fIVALUE\\fR"
    yield ".TP"
    yield head
    text = option.help
    if option.repeatable:
        text += " Repeatable."
    if option.default is not None:
        text += f" Default: {option.default}."
    yield roffText(text)


def _header(name: str, section: int, summary: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "" "Shifter {shifter.__version__}" "Shifter"',
        ".SH NAME",
        f"{roffText(name)} \\- {roffText(summary)}",
    ]


def shifter8() -> str:
    """
    The page C{shifter(8)}.
    """
    out = _header("shifter", 8, "transparent redirector through an upstream HTTP proxy")
    out += [
        ".SH SYNOPSIS",
        "\\fBshifter\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBshifter run\\fR [\\fB\\-\\-config\\fR \\fIFILE\\fR] [\\fB\\-\\-proxy\\fR \\fIHOST:PORT\\fR] [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBshifter check\\fR \\fB\\-\\-config\\fR \\fIFILE\\fR [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBshifter \\-\\-version\\fR",
        ".SH DESCRIPTION",
        roffText(_line(Options.longdesc)),
        ".SH COMMANDS",
    ]
    for name, text in commands():
        out += [".TP", f"\\fB{roffText(name)}\\fR", roffText(text)]
    out += [
        ".PP",
        roffText("shifter COMMAND --help prints a command's options; run and check take the options below."),
        ".SH OPTIONS",
        roffText("Every option is also a key of the same name in the configuration file; see shifter.toml(5)."),
    ]
    for option in options():
        out += _roffOption(option)
    out += [
        ".SH SIGNALS",
        ".TP",
        "\\fBSIGHUP\\fR",
        roffText("Reload the configuration file and reopen the access log."),
        ".TP",
        "\\fBSIGUSR1\\fR",
        roffText("Reopen the access log."),
        ".TP",
        "\\fBSIGTERM\\fR",
        roffText("Drain: stop accepting, let open tunnels end for up to --drain-timeout, then exit."),
        ".SH EXIT STATUS",
        roffText("0 on success; 1 for a configuration or command line that cannot be used, with one line on standard error naming the option."),
        ".SH FILES",
        ".TP",
        "\\fI/etc/shifter/shifter.toml\\fR",
        roffText("The configuration the systemd unit starts with; see shifter.toml(5)."),
        ".SH SEE ALSO",
        "\\fBshifter.toml\\fR(5), \\fBsystemctl\\fR(1), \\fBiptables\\fR(8), \\fBnft\\fR(8)",
    ]
    return "\n".join(out) + "\n"


def _roffKeys(title: str, keys: list[tuple[str, str]]) -> list[str]:
    out = [".SS " + roffText(title)]
    for key, text in keys:
        out += [".TP", f"\\fB{roffText(key)}\\fR", roffText(text)]
    return out


def shifterToml5() -> str:
    """
    The page C{shifter.toml(5)}.
    """
    out = _header("shifter.toml", 5, "configuration file of Shifter")
    out += [
        ".SH SYNOPSIS",
        "\\fI/etc/shifter/shifter.toml\\fR",
        ".SH DESCRIPTION",
        roffText(
            "A TOML file, given with --config, holding Shifter's options by their long names "
            "(idle-timeout = 600, allow = [\"10.0.0.0/8\"]), [[proxy]] tables (one upstream proxy each), "
            "[[rule]] tables (per-connection policy, matched in order, the first that matches deciding) "
            "and a [gateway] table that Shifter ignores and shifter doctor reads: each of its keys is the "
            "default of the doctor's option of the same name. Options given on the "
            "command line override the file's; --proxy, --allow and --allow-port add to it. SIGHUP reloads "
            "the file; a file with an error is refused with a log line while the running settings stay. "
            "shifter check --config FILE checks it as the start does."
        ),
        ".SH TOP-LEVEL KEYS",
        roffText("Each is the option of the same name of shifter(8); a flag is true or false, a repeatable option a list."),
    ]
    for option in options():
        if option.name == "config":
            continue
        kind = "true or false" if not option.value else ("a list" if option.repeatable else "a value")
        text = f"{option.help} In the file: {kind}."
        if option.default is not None:
            text += f" Default: {option.default}."
        out += [".TP", f"\\fB{roffText(option.name)}\\fR", roffText(text)]
    out += [".SH TABLES"]
    out += _roffKeys("[[proxy]]", _described(_PROXY_KEYS, PROXY_KEY_HELP, "[[proxy]]"))
    out += _roffKeys("[[rule]]", _described(_RULE_KEYS, RULE_KEY_HELP, "[[rule]]"))
    out += _roffKeys("[gateway]", _described(GATEWAY_KEYS, gatewayKeyHelp(), "[gateway]"))
    out += [".SH ACCESS LOG FIELDS", roffText("The names access-log-format takes, each written {name}:")]
    for name, (text, _) in FIELDS.items():
        out += [".TP", f"\\fB{roffText(name)}\\fR", roffText(text)]
    out += [
        ".SH EXAMPLE",
        ".nf",
        roffText(EXAMPLE.rstrip("\n")),
        ".fi",
        ".SH SEE ALSO",
        "\\fBshifter\\fR(8)",
    ]
    return "\n".join(out) + "\n"


# Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """
    C{docs/reference.md}.
    """
    out = [
        "# Shifter reference",
        "",
        "Generated by `make man` (`python -m shifter.admin.manpage docs`) from the definitions",
        "Shifter runs with; do not edit by hand. The [operator's guide](guide.md) says how to use them.",
        "",
        "- [Commands](#commands)",
        "- [Options and top-level configuration keys](#options-and-top-level-configuration-keys)",
        "- [Configuration tables](#configuration-tables)",
        "- [Metrics](#metrics)",
        "- [Access-log fields](#access-log-fields)",
        "",
        "## Commands",
        "",
        "| Command | What it does |",
        "|---|---|",
    ]
    out += [f"| `shifter {name}` | {_cell(text)} |" for name, text in commands()]
    out += [
        "",
        "## Options and top-level configuration keys",
        "",
        "Each option of `shifter run` (and `twistd shifter`, `shifter check`) is also a key of the",
        "same name at the top of the configuration file (except `config`); a flag is `true` or `false`",
        "there, a repeatable option a list.",
        "",
        "| Option | Default | Help |",
        "|---|---|---|",
    ]
    for option in options():
        name = f"`--{option.name}`" + (f" (`-{option.short}`)" if option.short else "")
        if option.repeatable:
            name += ", repeatable"
        if not option.value:
            name += ", flag"
        default = "off" if not option.value else ("none" if option.default is None else f"`{option.default}`")
        out.append(f"| {name} | {_cell(default)} | {_cell(option.help)} |")
    out += ["", "## Configuration tables", ""]
    for title, keys, help in (
        ("[[proxy]]", _PROXY_KEYS, PROXY_KEY_HELP),
        ("[[rule]]", _RULE_KEYS, RULE_KEY_HELP),
        ("[gateway]", GATEWAY_KEYS, gatewayKeyHelp()),
    ):
        out += [f"### `{title}`", "", "| Key | Meaning |", "|---|---|"]
        out += [f"| `{key}` | {_cell(text)} |" for key, text in _described(keys, help, title)]
        out.append("")
    out += ["## Metrics", "", "Served by `--metrics`, in Prometheus' text format.", "", "| Metric | Type | Labels | Help |", "|---|---|---|---|"]
    for metric in metrics():
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        out.append(f"| `{metric.name}` | {metric.kind} | {labels} | {_cell(metric.help)} |")
    out += [
        "",
        "## Access-log fields",
        "",
        "The names `--access-log-format` takes, each written `{name}`. The default format:",
        "",
        "```",
        str(Options().defaults["access-log-format"]),
        "```",
        "",
        "| Field | Meaning |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {_cell(text)} |" for name, (text, _) in FIELDS.items()]
    return "\n".join(out) + "\n"


# What is generated, by file name under docs/.
GENERATED = {
    "man/shifter.8": shifter8,
    "man/shifter.toml.5": shifterToml5,
    "reference.md": reference,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Write the generated files under the directory given (C{docs}).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m shifter.admin.manpage DOCS-DIRECTORY\n")
        return 1
    root = Path(args[0])
    for name, make in GENERATED.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
