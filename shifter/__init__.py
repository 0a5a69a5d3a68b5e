"""
Shifter: a transparent-proxy redirector.

Connections that netfilter redirects to Shifter are tunnelled, with an HTTP
C{CONNECT}, through an upstream proxy to the destination the client was
really trying to reach.
"""

__version__ = "0.1.0"
