"""
C{python -m shifter.kmod}: the kernel module's command, kept at its
documented name.  The module's client, its codec and C{--resolver=kmod}
are in L{shifter.resolvers.kmod}; nothing imports this package.
"""
