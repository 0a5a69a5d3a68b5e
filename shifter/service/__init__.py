"""
The running service: C{twistd shifter}'s options and C{makeService}, the config file, workers, the metrics page and the control socket.
It builds tunnel factories, resolvers, pools and relays from the configuration and serves them on endpoints.
May import: every package below (tunnel, resolvers, upstream, relay, kernel) and the base modules; never C{shifter.admin}.
"""
