"""
The C{shifter} generic netlink family's YNL spec
(C{kernel_module/Documentation/netlink/specs/shifter.yaml}), read the way
the kernel's YNL tools read it: names turned into C identifiers, values
counted from 1 in the order listed.  The host tests check the uapi header
and the Python codec against it; the guest tests ask the running module
what each operation refuses by it.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC_PATH = os.path.join(
    ROOT, "kernel_module", "Documentation", "netlink", "specs", "shifter.yaml"
)


def loadSpec() -> dict[str, Any]:
    with open(SPEC_PATH) as f:
        return yaml.safe_load(f)


def cName(prefix: str, name: str) -> str:
    """
    A spec name as the C identifier YNL makes of it.
    """
    return (prefix + name).upper().replace("-", "_")


def attributeSet(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [s for s in spec["attribute-sets"] if s["name"] == name]
    return found


def attributes(spec: dict[str, Any], setName: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """
    An attribute set's attributes: C name -> (value, the attribute's spec).
    """
    attrSet = attributeSet(spec, setName)
    return _numbered(attrSet["name-prefix"], attrSet["attributes"])


def operations(spec: dict[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """
    The operations: C name -> (command number, the operation's spec).
    """
    ops = spec["operations"]
    return _numbered(ops["name-prefix"], ops["list"])


def _numbered(prefix: str, entries: list[dict[str, Any]]) -> dict[str, tuple[int, dict[str, Any]]]:
    """
    Entries numbered as YNL numbers them (each one more than the last
    unless it gives its own C{value}, the first 1): C name -> (number,
    the entry's spec).
    """
    result = {}
    value = 0
    for entry in entries:
        value = entry.get("value", value + 1)
        result[cName(prefix, entry["name"])] = (value, entry)
    return result


def requestAttributes(spec: dict[str, Any], opName: str) -> list[str]:
    """
    The C names of the attributes an operation's request may carry.
    """
    value, op = operations(spec)[opName]
    prefix = attributeSet(spec, op["attribute-set"])["name-prefix"]
    return [cName(prefix, name) for name in op["do"]["request"]["attributes"]]
