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
