"""
The upstream HTTP proxy: how it is named on the command line and how Shifter
reaches it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from OpenSSL.SSL import Error as SSLError
from OpenSSL.crypto import Error as CryptoError

from zope.interface import implementer

from twisted.internet import tcp
from twisted.internet._resolver import HostResolution
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger

from shifter.upstream.connector import SO_MARK, DirectTCP
from shifter.upstream.passclient import checkPassClient

if TYPE_CHECKING:
    from shifter.upstream.auth import Credentials, ProxyAuth

_log = Logger()

# The kinds of upstream: an HTTP proxy (CONNECT, over TCP or TLS), a SOCKS5
# server, or none (DIRECT: Shifter connects to the destination itself).
HTTP = "http"
SOCKS5 = "socks5"
DIRECT = "direct"

# host:port, or [v6 literal]:port
_SHORTHAND = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True, eq=False)
class UpstreamProxy:
    """
    One upstream HTTP proxy.

    @ivar description: how the proxy is named in log lines (never with its
        password).
    @ivar endpoint: the client endpoint that connects to it (TLS included,
        for an https:// proxy).
    @ivar address: its (IP address, port) when known in advance, so that a
        connection redirected to the proxy itself can be refused; C{None}
        when the proxy is named by hostname or by a non-TCP endpoint.
    @ivar auth: its authentication state, when credentials are configured.
    @ivar passClient: what it is told about each client (C{--pass-client}):
        C{"none"}, C{"x-forwarded-for"}, C{"proxy-v1"} or C{"proxy-v2"}.
    @ivar direct: for a plain TCP proxy at a known C{address}, how
        L{shifter.upstream.connector} reaches it, cheaper per connection than the
        endpoint, which stays for everything else.
    @ivar host: the IP address or hostname it is reached at, as configured;
        C{None} for a non-TCP endpoint.
    @ivar port: its TCP port; C{None} for a non-TCP endpoint.
    @ivar name: for a proxy named by hostname, the addresses that name
        was resolved to, which its endpoint connects to.
    @ivar kind: L{HTTP}, L{SOCKS5} or L{DIRECT}.
    @ivar login: a SOCKS5 server's username and password (RFC 1929), as
        sent; C{None} for other kinds, or when none are configured.
    """

    description: str
    endpoint: IStreamClientEndpoint
    address: tuple[str, int] | None = None
    auth: ProxyAuth | None = None
    passClient: str = "none"
    direct: DirectTCP | None = None
    host: str | None = None
    port: int | None = None
    name: ProxyName | None = None
    kind: str = HTTP
    login: tuple[bytes, bytes] | None = None

    def toDestination(self, host: str, port: int) -> UpstreamProxy:
        """
        For the L{DIRECT} route: the route to one connection's destination,
        C{host} (an IP address) and C{port}.
        """
        assert self.kind == DIRECT and self.direct is not None
        return replace(self, direct=replace(self.direct, host=host, port=port))


@implementer(IStreamClientEndpoint)
class _NoEndpoint:
    """
    The endpoint of the L{DIRECT} route, which has no address of its own:
    each connection goes to its own destination (L{UpstreamProxy.toDestination}).
    """

    def connect(self, factory):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import fail

        return fail(ValueError("DIRECT connects to each connection's own destination"))


def directRoute(reactor, mark: int = 0) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    """
    The L{DIRECT} route: in a policy's list of proxies, it has Shifter
    connect to the connection's original destination address itself (never
    to a name read from the client), with the socket mark C{mark} if not 0.
    """
    return UpstreamProxy("DIRECT", _NoEndpoint(), direct=DirectTCP(reactor, "", 0, mark), kind=DIRECT)


def parseProxy(  # type: ignore[no-untyped-def]
    value: str,
    reactor,
    credentials: Credentials | None = None,
    caFile: str | None = None,
    passClient: str = "none",
    preemptiveBasic: bool = False,
    keytab: str | None = None,
    principal: str | None = None,
) -> UpstreamProxy:
    """
    Parse a C{--proxy} value: C{host:port}, C{[v6]:port},
    C{http://[user:password@]host:port}, C{https://[user:password@]host:port}
    (TLS to the proxy, its certificate verified against C{caFile} or the
    system's trust store), C{socks5://[user:password@]host:port} (a SOCKS5
    server, RFC 1928, with RFC 1929 username/password), or a Twisted
    client endpoint string such as C{tcp:host=10.0.0.5:port=3128}.  An
    HTTP URL may end with C{?pass-client=MODE}, this proxy's own
    C{--pass-client}; a SOCKS5 server is told nothing of the client.

    @param credentials: used when C{value} names none.
    @param passClient: what the proxy is told about each client, unless
        its URL says otherwise.
    @param preemptiveBasic: send the credentials with Basic from the first
        CONNECT, before the proxy asks (by default they are sent only once
        the proxy has challenged, in the scheme it asks for).
    @param keytab: the gateway's keytab, to answer Negotiate (Kerberos) as
        C{principal} (the keytab's first if C{None}) for the service
        C{HTTP/<host>}; a proxy named by address cannot be, and one line
        says so.
    @raise ValueError: with a one-line reason if the value is none of these,
        or the keytab cannot be read.
    """
    proxy = _parseProxy(value, reactor, credentials, caFile, passClient)
    negotiate = None
    if keytab is not None and proxy.kind == HTTP:  # a SOCKS5 server is not asked Negotiate
        negotiate = _negotiateLogin(proxy, reactor, keytab, principal)
    if (preemptiveBasic and proxy.auth is not None) or negotiate is not None:
        from shifter.upstream.auth import ProxyAuth

        proxy = replace(
            proxy,
            auth=ProxyAuth(
                proxy.auth.credentials if proxy.auth is not None else None,
                preemptiveBasic=preemptiveBasic,
                negotiate=negotiate,
            ),
        )
    return proxy


def _negotiateLogin(proxy: UpstreamProxy, reactor, keytab: str, principal: str | None):  # type: ignore[no-untyped-def]
    """
    The Negotiate login to C{proxy} with the gateway's keytab, or C{None}
    (with one log line) if the proxy is named by address.
    """
    from shifter.upstream.kerberos import NegotiateLogin, TicketKeeper

    try:
        with open(keytab, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read the keytab {keytab!r}: {e.strerror}") from None
    if proxy.host is None or _literalAddress(proxy.host, 0) is not None:
        _log.warn(
            "proxy {proxy} is named by address: Kerberos needs its host name (the service is HTTP/<host name>), "
            "so Shifter cannot answer it with Negotiate; name it by its host name",
            proxy=proxy.description,
        )
        return None
    return NegotiateLogin(TicketKeeper(keytab, principal, f"HTTP/{proxy.host.lower().rstrip('.')}", reactor))


def _parseProxy(value, reactor, credentials, caFile, passClient) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    checkPassClient(passClient)
    if value.startswith("socks5://"):
        return _parseSocks(value, reactor, credentials)
    if value.startswith(("http://", "https://")):
        proxy = _parseURL(value, reactor, credentials, caFile)
        return replace(proxy, passClient=_urlPassClient(value, passClient))
    match = _SHORTHAND.fullmatch(value)
    if match is None:
        if ":" not in value:
            raise ValueError(f"expected host:port, a URL or an endpoint string, got {value!r}")
        try:
            endpoint = clientFromString(reactor, value)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"invalid proxy endpoint {value!r}: {e}") from None
        host, port = _endpointHostPort(value) or (None, None)
        name = None
        if host is not None and _literalAddress(host, port) is None:
            name = ProxyName(host)
            endpoint = clientFromString(NameBoundReactor(reactor, name), value)
        return UpstreamProxy(
            value, endpoint, _literalAddress(host, port), _auth(credentials), passClient, host=host, port=port,
            name=name,
        )
    host = match.group("v6") or match.group("host")
    if match.group("v6"):
        _checkIPv6(host, value)
    proxy = _tcpProxy(value, reactor, host, _port(match.group("port"), value), credentials)
    return replace(proxy, passClient=passClient)


def _urlPassClient(value: str, default: str) -> str:
    """
    The C{pass-client} a proxy URL's query names, else C{default}.
    """
    query = urlsplit(value).query
    if not query:
        return default
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"malformed query in proxy URL {value!r}") from None
    unknown = sorted({name for name, _ in pairs} - {"pass-client"})
    if unknown:
        raise ValueError(f"unknown proxy URL parameter {unknown[0]!r} in {value!r}; only pass-client is known")
    if len(pairs) > 1:
        raise ValueError(f"pass-client given more than once in {value!r}")
    try:
        return checkPassClient(pairs[0][1])
    except ValueError as e:
        raise ValueError(f"pass-client in {value!r}: {e}") from None


def _parseSocks(value, reactor, credentials) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    from shifter.upstream.socks5 import checkCredentials

    url = urlsplit(value)
    if url.path not in ("", "/") or url.fragment or url.query or value.endswith("?"):
        raise ValueError(f"a SOCKS5 proxy URL has only a scheme, credentials, host and port: {value!r}")
    host, port, authority, credentials = _urlParts(url, value, credentials)
    login = None
    if credentials is not None:
        try:
            login = checkCredentials(credentials.username, credentials.password)
        except ValueError as e:
            raise ValueError(f"credentials for {value.split('@')[-1]!r}: {e}") from None
    plain = _tcpProxy(authority, reactor, host, port, None)
    return replace(plain, description=f"socks5://{authority}", kind=SOCKS5, login=login)


def _urlParts(url, value, credentials):  # type: ignore[no-untyped-def]
    """
    The host, port, C{host:port} (an IPv6 host in brackets) and credentials
    a proxy URL names (its credentials, if any, else C{credentials}).
    """
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"proxy port out of range in {value!r}") from None
    if port is None or url.hostname is None:
        raise ValueError(f"give the proxy's host and port: {value!r}")
    host = url.hostname
    if "[" in url.netloc:
        _checkIPv6(host, value)
    if url.username is not None:
        from shifter.upstream.auth import Credentials

        credentials = Credentials(unquote(url.username), unquote(url.password or ""))
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, authority, credentials


def _parseURL(value, reactor, credentials, caFile) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    url = urlsplit(value)
    if url.path not in ("", "/") or url.fragment:
        raise ValueError(
            f"a proxy URL has only a scheme, credentials, host, port and ?pass-client=: {value!r}"
        )
    host, port, authority, credentials = _urlParts(url, value, credentials)
    if url.scheme == "http":
        return _tcpProxy(authority, reactor, host, port, credentials)
    plain = _tcpProxy(authority, reactor, host, port, credentials)
    trustRoot = readTrustRoot(caFile) if caFile is not None else platformTrust()
    tls = wrapClientTLS(optionsForClientTLS(host, trustRoot=trustRoot), plain.endpoint)
    return UpstreamProxy(
        f"https://{authority}", tls, plain.address, plain.auth, host=plain.host, port=plain.port, name=plain.name
    )


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)

# The largest CA file read: the system's whole bundle is about 200 KiB.
_MAX_CA_FILE = 16 << 20


def readTrustRoot(caFile: str):  # type: ignore[no-untyped-def]
    """
    The trust root of every certificate in the PEM file C{caFile}: one CA,
    or a bundle of them (each is trusted, as in the system's store).

    @raise ValueError: with a one-line reason, if the file cannot be read
        or holds no certificate that can be loaded.
    """
    try:
        with open(caFile, "rb") as f:
            data = f.read(_MAX_CA_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot read the proxy CA file {caFile!r}: {e.strerror}") from None
    if len(data) > _MAX_CA_FILE:
        raise ValueError(f"the proxy CA file {caFile!r} is larger than {_MAX_CA_FILE >> 20} MiB")
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError(f"the proxy CA file {caFile!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(Certificate.loadPEM(block))
        except (ValueError, SSLError, CryptoError):
            raise ValueError(f"the proxy CA file {caFile!r}: certificate {number} cannot be loaded") from None
    return trustRootFromCertificates(certificates)


def _tcpProxy(description, reactor, host, port, credentials) -> UpstreamProxy:  # type: ignore[no-untyped-def]
    from shifter.upstream.connect import checkHost

    try:
        checkHost(host)
    except ValueError as e:
        raise ValueError(f"proxy host in {description!r}: {e}") from None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A hostname: connected to at the addresses it was last resolved
        # to (see ProxyName), never looked up per connection.
        name = ProxyName(host)
        named = TCP4ClientEndpoint(NameBoundReactor(reactor, name), host, port)
        return UpstreamProxy(description, named, None, _auth(credentials), host=host, port=port, name=name)
    endpoint: IStreamClientEndpoint
    if address.version == 6:
        endpoint = TCP6ClientEndpoint(reactor, address.compressed, port)
    else:
        endpoint = TCP4ClientEndpoint(reactor, str(address), port)
    if isinstance(reactor, MarkingReactor):
        direct = DirectTCP(reactor.reactor, address.compressed, port, reactor.mark)
    else:
        direct = DirectTCP(reactor, address.compressed, port)
    return UpstreamProxy(
        description, endpoint, (address.compressed, port), _auth(credentials), direct=direct,
        host=address.compressed, port=port,
    )


def _port(text: str, value: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"proxy port out of range in {value!r}")
    return port


def _checkIPv6(host: str, value: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"invalid IPv6 address in {value!r}") from None


def _auth(credentials: Credentials | None) -> ProxyAuth | None:
    if credentials is None:
        return None
    from shifter.upstream.auth import ProxyAuth

    return ProxyAuth(credentials)


def credentialsPath(path: str, environ: Mapping[str, str] | None = None) -> str:
    """
    Where the credentials C{path} names are: under systemd's
    C{$CREDENTIALS_DIRECTORY} (C{LoadCredential=}) when that is set and
    C{path} is a bare name, a credential's name; else C{path} itself.
    """
    directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if directory and path and "/" not in path:
        return os.path.join(directory, path)
    return path


def readCredentials(path: str, environ: Mapping[str, str] | None = None) -> Credentials:
    """
    Read C{user:password} from the first line of the file at C{path}, so
    that the password stays out of the process list.  The user name may
    name a domain, C{DOMAIN\\user}, as NTLM needs.  A bare name is a
    systemd credential when C{$CREDENTIALS_DIRECTORY} is set
    (L{credentialsPath}).

    @raise ValueError: if the file cannot be read or has no C{user:password}.
    """
    path = credentialsPath(path, environ)
    try:
        with open(path) as f:
            line = f.readline().rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    username, colon, password = line.partition(":")
    if not colon or not username:
        raise ValueError(f"{path!r} should hold user:password on its first line")
    from shifter.upstream.auth import Credentials

    return Credentials(username, password)


# The client endpoint kinds that reach a proxy over TCP, and the
# positional arguments that name its host and port.
_TCP_ENDPOINTS = ("tcp", "tcp6", "ssl", "tls")


def _endpointHostPort(description: str) -> tuple[str, int] | None:
    """
    The host and port a TCP client endpoint string names
    (C{tcp:host=10.0.0.5:port=3128}, C{tcp:10.0.0.5:3128},
    C{tcp6:host=2001\\:db8\\:\\:5:port=3128}, C{tls:...}, C{ssl:...}), read
    from the string (L{splitEndpoint}); C{None} for other kinds or when the
    string names none.
    """
    from shifter.upstream.endpointstrings import splitEndpoint

    kind, positional, keywords = splitEndpoint(description)
    if kind not in _TCP_ENDPOINTS:
        return None
    host = keywords.get("host", positional[0] if positional else None)
    portText = keywords.get("port", positional[1] if len(positional) > 1 else None)
    if not host or portText is None or not portText.isdigit() or not 0 < int(portText) < 65536:
        return None
    return host, int(portText)


def _literalAddress(host: str | None, port: int | None) -> tuple[str, int] | None:
    """
    (host, port) with the host compressed, if C{host} is an IP literal.
    """
    if host is None or port is None:
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).compressed, port
    except ValueError:
        return None



class _MarkedClient(tcp.Client):
    """
    A TCP client connection whose socket carries a netfilter mark from
    before its SYN, so that firewall rules can tell Shifter's own
    connections apart (for example, to keep them out of the redirect).
    """

    def __init__(self, host, port, bindAddress, connector, reactor, mark):  # type: ignore[no-untyped-def]
        self._mark = mark
        super().__init__(host, port, bindAddress, connector, reactor)

    def createInternetSocket(self):  # type: ignore[no-untyped-def]
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
        return skt


class _MarkedConnector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, bindAddress, reactor, mark):  # type: ignore[no-untyped-def]
        self._mark = mark
        super().__init__(host, port, factory, timeout, bindAddress, reactor)

    def _makeTransport(self) -> tcp.Client:
        return _MarkedClient(self.host, self.port, self.bindAddress, self, self.reactor, self._mark)


class MarkingReactor:
    """
    The reactor as client endpoints see it, except that the TCP connections
    they make carry the socket mark C{mark} (C{SO_MARK}; needs
    CAP_NET_ADMIN).  Endpoints built on this reactor, from a host:port or
    from an endpoint string, need no other change.
    """

    def __init__(self, reactor, mark: int) -> None:  # type: ignore[no-untyped-def]
        self.reactor = reactor
        self.mark = mark

    def connectTCP(self, host, port, factory, timeout=30.0, bindAddress=None):  # type: ignore[no-untyped-def]
        connector = _MarkedConnector(host, port, factory, timeout, bindAddress, self.reactor, self.mark)
        connector.connect()
        return connector

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.reactor, name)


class ProxyName:
    """
    A proxy's hostname and the addresses it was last resolved to.

    L{shifter.tunnel.destinations.ProxyAddresses} resolves it at start and every
    minute after, in the reactor, and sets L{addresses}; each connection
    to the proxy (tunnels and probes alike) goes to one of them through a
    L{NameBoundReactor}, with no look-up of its own: no read of
    C{/etc/hosts}, no DNS query per tunnel.  Until the name has been
    resolved once, connections fail with a reason that says so.

    @ivar name: the hostname, as configured.
    @ivar addresses: its IP addresses, IPv4 ones first; empty until known.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: tuple[str, ...] = ()

    def setAddresses(self, addresses: frozenset[str]) -> None:
        """
        Use C{addresses} (IPv4 and IPv6) from now on.
        """
        self.addresses = tuple(sorted(addresses, key=lambda a: (":" in a, a)))

    def address(self) -> str:
        """
        The address the next connection goes to: the first IPv4 one, else
        the first IPv6 one (a TCP connection takes one address; a proxy
        whose first address fails is counted down like any other).

        @raise DNSLookupError: while the name has not been resolved.
        """
        if not self.addresses:
            raise DNSLookupError(f"the address of proxy host {self.name} is not known yet (not resolved since start)")
        return self.addresses[0]

    def names(self, host: str) -> bool:
        """
        Whether C{host} is this name (DNS names are not case-sensitive).
        """
        return host.lower().rstrip(".") == self.name.lower().rstrip(".")


@implementer(IReactorPluggableNameResolver)
class NameBoundReactor:
    """
    The reactor as a hostname proxy's endpoint sees it: a connection to
    the proxy's name goes to the address its L{ProxyName} holds, one to an
    IP address goes as asked, one to any other name is refused.  The name
    resolver that C{tls:} endpoint strings use answers the same way.
    """

    def __init__(self, reactor, name: ProxyName) -> None:  # type: ignore[no-untyped-def]
        self.reactor = reactor
        self.proxyName = name
        self.nameResolver = _KnownNameResolver(name)

    def _address(self, host: str) -> str:
        if isIPAddress(host) or isIPv6Address(host):
            return host
        if not self.proxyName.names(host):
            raise DNSLookupError(f"{host} is not the proxy's name ({self.proxyName.name}); not looked up")
        return self.proxyName.address()

    def connectTCP(self, host, port, factory, timeout=30.0, bindAddress=None):  # type: ignore[no-untyped-def]
        return self.reactor.connectTCP(self._address(host), port, factory, timeout, bindAddress)

    def connectSSL(self, host, port, factory, contextFactory, timeout=30.0, bindAddress=None):  # type: ignore[no-untyped-def]
        return self.reactor.connectSSL(self._address(host), port, factory, contextFactory, timeout, bindAddress)

    def resolve(self, name: str, timeout=(1, 3, 11, 45)):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import fail, succeed

        try:
            return succeed(self._address(name))
        except DNSLookupError as e:
            return fail(e)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("a proxy's name resolver is fixed")

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.reactor, name)


@implementer(IHostnameResolver)
class _KnownNameResolver:
    """
    Answers for one proxy's name from its L{ProxyName}, and for IP
    addresses with themselves.
    """

    def __init__(self, name: ProxyName) -> None:
        self.proxyName = name

    def resolveHostName(  # type: ignore[no-untyped-def]
        self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
        addressTypes=None, transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        if isIPAddress(hostName) or isIPv6Address(hostName):
            addresses: tuple[str, ...] = (hostName,)
        elif self.proxyName.names(hostName):
            addresses = self.proxyName.addresses
        else:
            addresses = ()
        for address in addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            if addressTypes is None or kind in addressTypes:
                receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()
        return resolution

