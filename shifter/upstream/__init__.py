"""
The upstream side: the proxies and the CONNECT to them, reporting to the tunnel through C{shifter.interfaces}.
Here: the CONNECT codec, authentication, connectors and the attempt protocol, proxy specs, the pool and its probe, client identity (XFF, PROXY).
May import: C{shifter.kernel} and the base modules; never the resolvers, the relays or anything above.
"""
