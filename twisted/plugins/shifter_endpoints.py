"""
Endpoint string dropin: C{tproxy:PORT[:interface=ADDRESS]}, Shifter's
transparent listener for TPROXY rules.
"""

from shifter.tproxy import TransparentServerParser

tproxyEndpoint = TransparentServerParser()
