"""
The twistd dropin for C{twistd shifter}.
"""

from twisted.application.service import ServiceMaker

shifter = ServiceMaker(
    "Shifter",
    "shifter.service.tap",
    "Relay netfilter-redirected connections through an HTTP proxy (CONNECT).",
    "shifter",
)
