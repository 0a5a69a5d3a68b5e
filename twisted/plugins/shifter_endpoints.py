"""
Endpoint string dropin: C{tproxy:PORT[:interface=ADDRESS]}, Shifter's
transparent listener for TPROXY rules.
"""

from shifter.resolvers.tproxy import TransparentServerParser

tproxyEndpoint = TransparentServerParser()
