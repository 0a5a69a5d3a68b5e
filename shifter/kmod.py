"""
The Shifter kernel module's generic netlink interface, as seen from Python.

The names and numbers mirror C{kernel_module/include/uapi/linux/shifter.h};
keep the two in step.
"""

from __future__ import annotations

from pyroute2.netlink import genlmsg, nla

SHIFTER_GENL_NAME = "shifter"
SHIFTER_GENL_VERSION = 1
SHIFTER_MAX_PORTS = 64

SHIFTER_CMD_UNSPEC = 0
SHIFTER_CMD_GET = 1
SHIFTER_CMD_STATS = 2
SHIFTER_CMD_GET_PORTS = 3
SHIFTER_CMD_SET_PORTS = 4


class shifter_msg(genlmsg):
    """
    A message of the C{shifter} generic netlink family.
    """

    prefix = "SHIFTER_A_"
    nla_map = (
        ("SHIFTER_A_UNSPEC", "none"),
        ("SHIFTER_A_FAMILY", "uint8"),
        ("SHIFTER_A_SRC_ADDR", "cdata"),
        ("SHIFTER_A_SRC_PORT", "uint16"),
        ("SHIFTER_A_DST_ADDR", "cdata"),
        ("SHIFTER_A_DST_PORT", "uint16"),
        ("SHIFTER_A_STATS", "stats"),
        ("SHIFTER_A_PORTS", "ports"),
        ("SHIFTER_A_PAD", "none"),
    )

    class stats(nla):
        prefix = "SHIFTER_STAT_"
        nla_map = (
            ("SHIFTER_STAT_UNSPEC", "none"),
            ("SHIFTER_STAT_ENTRIES", "uint64"),
            ("SHIFTER_STAT_INSERTS", "uint64"),
            ("SHIFTER_STAT_LOOKUPS", "uint64"),
            ("SHIFTER_STAT_HITS", "uint64"),
            ("SHIFTER_STAT_MISSES", "uint64"),
            ("SHIFTER_STAT_EVICTIONS", "uint64"),
            ("SHIFTER_STAT_EXPIRIES", "uint64"),
            ("SHIFTER_STAT_PAD", "none"),
        )

    class ports(nla):
        prefix = "SHIFTER_A_PORTS_"
        nla_map = (
            ("SHIFTER_A_PORTS_UNSPEC", "none"),
            ("SHIFTER_A_PORTS_PORT", "uint16"),
        )
