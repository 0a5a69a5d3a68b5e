"""
Shifter's installer: the package and its twistd dropin.

After installing, refresh Twisted's plugin cache (the Makefile does):
    python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
"""

from setuptools import setup

import re

with open("shifter/__init__.py") as f:
    version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="shifter",
    version=version,
    description="Transparent-proxy redirector: netfilter-redirected TCP "
    "connections tunnelled through an HTTP proxy with CONNECT",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # Each of shifter's packages by name (README, Layout), and the dropins.
    packages=[
        "shifter",
        "shifter.admin",
        "shifter.kernel",
        "shifter.kmod",
        "shifter.relay",
        "shifter.resolvers",
        "shifter.service",
        "shifter.tunnel",
        "shifter.pac",
        "shifter.upstream",
        "twisted.plugins",
    ],
    # The shifter command is declared in pyproject.toml ([project.scripts]).
    package_data={"twisted.plugins": ["shifter_plugin.py", "shifter_endpoints.py", "shifter_reactor.py"]},
    # Twisted[tls]: pyOpenSSL, service_identity and idna, which shifter.upstream.proxy
    # imports for https:// proxies (and so twistd shifter --help needs).
    install_requires=[
        "Twisted[tls]>=23.8",
        "pyroute2>=0.7",
        "zope.interface>=5",
        "prometheus_client>=0.17",
        # NTLM to the proxy.
        "pyspnego>=0.10",
        # Negotiate (Kerberos) to the proxy, over the system's MIT Kerberos
        # (Debian: libkrb5-dev to build gssapi).
        "gssapi>=1.8",
        # The PAC helper's JavaScript engine (QuickJS inside), see shifter.pac.child.
        "dukpy>=0.6",
    ],
    extras_require={"test": ["hypothesis", "virtme-ng"]},
)
