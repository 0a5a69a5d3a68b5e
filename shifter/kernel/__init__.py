"""
Codecs for the kernel's netlink interfaces, driven by the reactor: they know nothing of tunnels.
Here: the netlink transport and request matching, and the dump of this machine's addresses.
May import: the base modules (C{shifter.interfaces}, C{shifter.logs}) only.
"""
