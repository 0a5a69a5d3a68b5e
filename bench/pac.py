"""
What a PAC answer costs a connection: the uncached evaluation (a round
trip to a helper process and C{FindProxyForURL} there), the cached
answer, and the whole decision (rules, then PAC, then the proxies built
from the answer) on a cached answer, against the rules alone.  Then many
distinct hosts through a bounded cache.  Real helper processes, driven by
the real reactor; no network (the script looks no name up).  Reports,
never asserts.

    .venv/bin/python bench/pac.py [UNCACHED [CACHED [HOSTS]]]

Defaults: 2000 uncached calls, 20000 cached ones, 10000 distinct hosts
through a cache of 5000.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402

from shifter.pac.evaluator import PacEvaluator  # noqa: E402
from shifter.pac.fetch import PacSource  # noqa: E402
from shifter.service.config import Rule, RulePolicy  # noqa: E402
from shifter.service.pacpolicy import PacPolicy  # noqa: E402
from shifter.tunnel.policy import TunnelRequest  # noqa: E402
from shifter.upstream.pool import ProxyPool  # noqa: E402
from shifter.upstream.proxy import directRoute, parseProxy  # noqa: E402

# A PAC of the usual shape: plain names and internal domains DIRECT,
# internal networks DIRECT (by address only: no look-up), one domain to
# its own proxy, the rest to two proxies then DIRECT.
SCRIPT = r"""
function FindProxyForURL(url, host) {
  if (isPlainHostName(host) || dnsDomainIs(host, ".corp.example") || shExpMatch(host, "*.intra.example"))
    return "DIRECT";
  if (/^[0-9.]+$/.test(host) && (isInNet(host, "10.0.0.0", "255.0.0.0") || isInNet(host, "192.168.0.0", "255.255.0.0")))
    return "DIRECT";
  if (shExpMatch(url, "https://*.bank.example/*")) return "PROXY 192.0.2.20:3128";
  return "PROXY 192.0.2.10:3128; PROXY 192.0.2.11:3128; DIRECT";
}
"""


def summary(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"median {statistics.median(samples) * 1e6:8.1f} us, p99 {q[98] * 1e6:8.1f} us ({len(samples)} calls)"


@inlineCallbacks
def run(uncached: int, cached: int, hosts: int) -> Any:
    evaluator = PacEvaluator(reactor, cacheSize=max(hosts // 2, 1))
    try:
        yield evaluator.load(SCRIPT)
        for i in range(50):  # warm-up
            yield evaluator.find(f"https://warm{i}.example/", f"warm{i}.example", 443)
        times = []
        for i in range(uncached):
            start = time.perf_counter()
            yield evaluator.find(f"https://u{i}.example/", f"u{i}.example", 443)
            times.append(time.perf_counter() - start)
        print(f"uncached evaluation (helper round trip):  {summary(times)}")
        times = []
        for i in range(cached):
            start = time.perf_counter()
            yield evaluator.find("https://u0.example/", "u0.example", 443)
            times.append(time.perf_counter() - start)
        print(f"cached answer:                            {summary(times)}")

        pool = ProxyPool([parseProxy("192.0.2.10:3128", reactor)], reactor)
        rules = RulePolicy([Rule(line=1, ports=(), names=("corp.example",), group="default")],
                           {"default": pool.proxies})
        source = PacSource("unused", evaluator, reactor)
        source.firstAttempt.callback(None)
        policy = PacPolicy(evaluator, source, rules, {"default": pool.proxies}, pool, directRoute(reactor),
                           lambda url: parseProxy(url, reactor))
        request = TunnelRequest(IPv4Address("TCP", "192.0.2.2", 0), IPv4Address("TCP", "203.0.113.7", 443),
                                "u0.example", tuple(pool.proxies))
        for label, decide in [("rules alone:", rules.decide), ("rules, then a cached PAC answer:", policy.decide)]:
            times = []
            for i in range(cached):
                start = time.perf_counter()
                yield decide(request)
                times.append(time.perf_counter() - start)
            print(f"decision, {label:31} {summary(times)}")

        biggest = 0
        start = time.perf_counter()
        for i in range(hosts):
            yield evaluator.find(f"https://d{i}.example/", f"d{i}.example", 443)
            biggest = max(biggest, len(evaluator.cache))
        print(f"{hosts} distinct hosts in {time.perf_counter() - start:.1f} s: the cache held at most {biggest} "
              f"answers (bound {evaluator.cacheSize})")
    finally:
        yield evaluator.stop()
        reactor.stop()


def main() -> None:
    counts = [int(a) for a in sys.argv[1:4]]
    uncached, cached, hosts = counts + [2000, 20000, 10000][len(counts):]
    reactor.callWhenRunning(run, uncached, cached, hosts)
    reactor.run()


if __name__ == "__main__":
    main()
