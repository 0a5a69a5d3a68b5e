"""
Shifter embedded in a program of its own, with a policy.

Clients from the lab network go through the lab's proxy, everyone else
through the office proxy, and one destination is refused for all:

    python examples/policy_gateway.py --listen tcp:12345 \\
        --lab 192.168.10.0/24 --lab-proxy 10.0.0.6:3128 \\
        --office-proxy 10.0.0.5:3128 --refuse 203.0.113.66

It runs in its own reactor, with Shifter's factory as one of its parts; a
real program would add its own services beside it.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from zope.interface import implementer

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver

from shifter import (
    ITunnelPolicy,
    ProxyPool,
    ShifterFactory,
    SocketOptionResolver,
    TunnelDecision,
    TunnelRequest,
    TunnelSettings,
    UpstreamProxy,
    parseProxy,
)


@implementer(ITunnelPolicy)
class LabAndOfficePolicy:
    """
    Lab clients use the lab proxy, others the office proxy; one destination
    address is refused.
    """

    def __init__(
        self,
        lab: ipaddress.IPv4Network | ipaddress.IPv6Network,
        labProxy: UpstreamProxy,
        officeProxy: UpstreamProxy,
        refused: str,
    ) -> None:
        self.lab = lab
        self.labProxy = labProxy
        self.officeProxy = officeProxy
        self.refused = ipaddress.ip_address(refused)

    def decide(self, request: TunnelRequest) -> TunnelDecision:
        if ipaddress.ip_address(request.destination.host) == self.refused:
            return TunnelDecision(refuse=f"{self.refused} is not reachable from here")
        if ipaddress.ip_address(request.client.host) in self.lab:
            return TunnelDecision(proxies=[self.labProxy])
        return TunnelDecision(proxies=[self.officeProxy])


@inlineCallbacks
def main(reactor, *argv: str):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="tcp:12345")
    parser.add_argument("--lab", required=True, type=ipaddress.ip_network)
    parser.add_argument("--lab-proxy", required=True)
    parser.add_argument("--office-proxy", required=True)
    parser.add_argument("--refuse", required=True)
    arguments = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    labProxy = parseProxy(arguments.lab_proxy, reactor)
    officeProxy = parseProxy(arguments.office_proxy, reactor)
    policy = LabAndOfficePolicy(arguments.lab, labProxy, officeProxy, arguments.refuse)
    factory = ShifterFactory(
        SocketOptionResolver(),
        ProxyPool([officeProxy, labProxy], reactor),
        TunnelSettings(),
        reactor,
        policy=policy,
    )
    port = yield serverFromString(reactor, arguments.listen).listen(factory)
    print(f"policy gateway listening on {port.getHost()}", flush=True)
    yield Deferred()  # serve until stopped


if __name__ == "__main__":
    react(main, sys.argv[1:])
