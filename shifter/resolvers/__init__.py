"""
Original-destination resolvers: where a redirected connection was going, one interface, several kernels' answers.
Here: the interface and C{Destination}, sockopt, tproxy, conntrack, nfqueue, kmod, auto.
May import: C{shifter.kernel} and the base modules; never the upstream side, the relays or anything above.
"""
