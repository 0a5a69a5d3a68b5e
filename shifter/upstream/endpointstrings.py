"""
Twisted endpoint strings read as Twisted's grammar has them, so that Shifter
knows the host, port and options it was given from the string itself
rather than from the private attributes of the endpoint built from it.
"""

from __future__ import annotations


def splitEndpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint string (C{tcp:host=10.0.0.5:port=3128},
    C{tcp6:12345:interface=\\\\:\\\\:}) into its kind, its positional
    arguments and its keyword arguments: arguments are separated by
    unescaped colons, a keyword argument is C{key=value} at its first
    unescaped C{=}, and a backslash escapes the character after it.
    """
    parts: list[tuple[str, str | None]] = []
    current: list[str] = []
    key: str | None = None
    escaped = False
    for char in description + ":":
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(("".join(current), None) if key is None else (key, "".join(current)))
            current, key = [], None
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    kind = parts[0][0] if parts[0][1] is None else ""
    positional = [name for name, value in parts[1:] if value is None]
    keywords = {name: value for name, value in parts[1:] if value is not None}
    return kind, positional, keywords


# The listening endpoint kinds that take a backlog, with their positional
# arguments in the order their parsers take them (Twisted's tcp and tcp6
# differ; Shifter's tproxy follows tcp6).
LISTENING_ARGUMENTS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "tproxy": ("port", "backlog", "interface"),
}


def listeningArguments(description: str) -> tuple[str, dict[str, str]] | None:
    """
    The kind of a C{tcp:}, C{tcp6:} or C{tproxy:} server endpoint string and
    its arguments by name, positional ones named as their parser names
    them; C{None} for any other kind, or more positional arguments than it
    takes.
    """
    kind, positional, keywords = splitEndpoint(description)
    names = LISTENING_ARGUMENTS.get(kind)
    if names is None or len(positional) > len(names):
        return None
    return kind, {**dict(zip(names, positional)), **keywords}


def withBacklog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=}C{backlog} added, if it is a listening
    endpoint string that takes a backlog and names none; any other as it is.
    """
    parsed = listeningArguments(description)
    if parsed is None or "backlog" in parsed[1]:
        return description
    return f"{description}:backlog={backlog}"
