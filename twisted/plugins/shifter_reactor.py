"""
The reactor dropin for C{twistd --reactor shifter}: Twisted's epoll reactor
without a log context per dispatch (L{shifter.service.reactor}).
"""

from twisted.application.reactors import Reactor

shifterReactor = Reactor(
    "shifter",
    "shifter.service.reactor",
    "epoll, dispatching without a log context per event (Shifter's)",
)
