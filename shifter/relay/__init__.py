"""
The relays that join a client to its proxy once the tunnel is open, reporting through C{shifter.interfaces}.
Here: splice(2) between the two sockets, and Twisted's producer/consumer relay.
May import: C{shifter.kernel} and the base modules; never the resolvers, the upstream side or anything above.
"""
