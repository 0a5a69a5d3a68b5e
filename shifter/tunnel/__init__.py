"""
The tunnel: one connection's life from accept to close, as a table of (state, event) to action, and what decides it.
Here: the machine and its table, deadlines, the client protocol and factory, limits, the sniffer, destination checks, policy, negotiation, hold-SYN, counters.
May import: C{shifter.resolvers}, C{shifter.upstream}, C{shifter.relay}, C{shifter.kernel} and the base modules; never the service or the admin's tools.
"""
