"""
A real DNS server for tests: an in-memory zone served with L{twisted.names}
over UDP and TCP on 127.0.0.1, on a port the OS picked.

In the test process (any reactor, usually the global one)::

    server = DNSServer(reactor)
    server.addMX("example.test", [(10, "mx1.example.test")], ttl=300)
    server.addA("mx1.example.test", "127.0.0.1")
    port = server.start()
    self.addCleanup(server.stop)
    resolver = makeResolver(server.nameservers, reactor)

Names that are not in the zone get an authoritative NXDOMAIN; names that
are, but without records of the asked type, get an empty answer (NODATA).

As a separate process, for C{twistd smartrelay} children or benchmarks::

    python tests/dnsserver.py --zone zone.json

prints C{port NNNN} on its first line of output once it listens, then serves
until SIGTERM/SIGINT.  The zone file is JSON::

    {"ttl": 300,
     "mx": {"example.test": [[10, "mx1.example.test"]]},
     "a": {"mx1.example.test": ["127.0.0.1"]},
     "aaaa": {"mx1.example.test": ["::1"]},
     "nullmx": ["nomail.test"],
     "servfail": ["broken.test"]}

(L{startProcess} does this and returns the process and its port.)
"""

import argparse
import json
import os
import select
import subprocess
import sys
from typing import Any, Iterable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.python import log
from twisted.python.failure import Failure

__all__ = ["DNSServer", "startProcess", "loadZone"]


def _key(name: Any) -> str:
    """
    Normalise a domain name: text, lower case, no trailing dot.
    """
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.rstrip(".").lower()


class _ServerFailure(Exception):
    """
    The zone says to answer this name with SERVFAIL.
    """


class _Zone:
    """
    The authority: an L{IResolver}-like object answering C{query} from
    dictionaries.  Only C{query} is used by L{server.DNSServerFactory}.
    """

    def __init__(self) -> None:
        self.records: dict = {}
        self.servfail: set = set()

    def add(self, name: str, record: Any, ttl: int) -> None:
        key = _key(name)
        self.records.setdefault(key, []).append((record, ttl))

    def remove(self, name: str, type: Optional[int] = None) -> None:
        key = _key(name)
        if type is None:
            self.records.pop(key, None)
        else:
            kept = [(r, t) for r, t in self.records.get(key, []) if r.TYPE != type]
            if kept:
                self.records[key] = kept
            else:
                self.records.pop(key, None)

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred:
        key = _key(query.name)
        if key in self.servfail:
            return defer.fail(_ServerFailure(key))
        if key not in self.records:
            return defer.fail(dns.AuthoritativeDomainError(key))
        answers = [
            dns.RRHeader(
                name=query.name.name,
                type=record.TYPE,
                cls=dns.IN,
                ttl=ttl,
                payload=record,
                auth=True,
            )
            for record, ttl in self.records[key]
            if query.type in (record.TYPE, dns.ALL_RECORDS)
        ]
        return defer.succeed((answers, [], []))


class _Factory(server.DNSServerFactory):
    """
    A L{server.DNSServerFactory} that records the queries it receives,
    answers SERVFAIL for L{_ServerFailure} without logging an error (trial
    would fail the test) and marks NXDOMAIN answers authoritative.
    """

    def __init__(self, zone: _Zone, queries: list) -> None:
        super().__init__(authorities=[zone])
        self._queries = queries

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        for query in message.queries:
            self._queries.append((_key(query.name), query.type))
        super().handleQuery(message, protocol, address)

    def gotResolverError(
        self, failure: Failure, protocol: Any, message: dns.Message, address: Any
    ) -> None:
        if failure.check(dns.DomainError, dns.AuthoritativeDomainError):
            response = self._responseFromMessage(message=message, rCode=dns.ENAME)
            response.auth = True
        else:
            if not failure.check(_ServerFailure):
                log.err(failure, "tests.dnsserver: unexpected failure")
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
        self.sendReply(protocol, response, address)


class DNSServer:
    """
    An in-memory zone served over UDP and TCP on 127.0.0.1.

    Records can be added or removed before or after L{start}.

    @ivar queries: C{(name, type)} of every query received, in order:
        C{name} is lower-case text without the trailing dot, C{type} a
        L{twisted.names.dns} type code (C{dns.MX}, C{dns.A}, ...).
    @ivar port: the UDP and TCP port number, once started.
    """

    def __init__(self, reactor: Any, interface: str = "127.0.0.1") -> None:
        self._reactor = reactor
        self._interface = interface
        self._zone = _Zone()
        self.queries: list = []
        self.port: Optional[int] = None
        self._factory = _Factory(self._zone, self.queries)
        self._udp: Any = None
        self._tcp: Any = None

    # -- the zone ----------------------------------------------------------

    def addMX(self, domain: str, exchangers: Iterable[Sequence], ttl: int = 300) -> None:
        """
        Add MX records to C{domain}.

        @param exchangers: C{(preference, host name)} pairs.
        """
        for preference, host in exchangers:
            self._zone.add(domain, dns.Record_MX(int(preference), host, ttl=ttl), ttl)

    def nullMX(self, domain: str, ttl: int = 300) -> None:
        """
        Make C{domain} an RFC 7505 null MX domain (C{MX 0 .}).
        """
        self._zone.add(domain, dns.Record_MX(0, b"", ttl=ttl), ttl)

    def addA(self, host: str, address: str, ttl: int = 300) -> None:
        """
        Add an IPv4 address record to C{host}.
        """
        self._zone.add(host, dns.Record_A(address, ttl=ttl), ttl)

    def addAAAA(self, host: str, address: str, ttl: int = 300) -> None:
        """
        Add an IPv6 address record to C{host}.
        """
        self._zone.add(host, dns.Record_AAAA(address, ttl=ttl), ttl)

    def addTXT(self, host: str, text: str, ttl: int = 300) -> None:
        """
        Add a TXT record to C{host} (also makes the name exist, so that
        other types get NODATA rather than NXDOMAIN).  A text longer than
        255 bytes is cut into several strings, as a DKIM key is published.
        """
        data = text.encode("utf-8")
        strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        self._zone.add(host, dns.Record_TXT(*strings, ttl=ttl), ttl)

    def addPTR(self, address: str, host: str, ttl: int = 300) -> None:
        """
        Add a reverse DNS record: C{address} (IPv4 or IPv6) is C{host}.
        """
        import ipaddress

        name = ipaddress.ip_address(address).reverse_pointer
        self._zone.add(name, dns.Record_PTR(host, ttl=ttl), ttl)

    def servfail(self, domain: str) -> None:
        """
        Answer every query for C{domain} with SERVFAIL.
        """
        self._zone.servfail.add(_key(domain))

    def remove(self, name: str, type: Optional[int] = None) -> None:
        """
        Remove the records of C{name} (of one type, or all) and its SERVFAIL
        marking: it becomes NXDOMAIN if nothing is left.
        """
        self._zone.remove(name, type)
        if type is None:
            self._zone.servfail.discard(_key(name))

    def loadZone(self, zone: dict) -> None:
        """
        Add the records of a zone dictionary (the JSON format of the module
        docstring).
        """
        ttl = int(zone.get("ttl", 300))
        for domain, exchangers in zone.get("mx", {}).items():
            self.addMX(domain, exchangers, ttl=ttl)
        for host, addresses in zone.get("a", {}).items():
            for address in [addresses] if isinstance(addresses, str) else addresses:
                self.addA(host, address, ttl=ttl)
        for host, addresses in zone.get("aaaa", {}).items():
            for address in [addresses] if isinstance(addresses, str) else addresses:
                self.addAAAA(host, address, ttl=ttl)
        for domain in zone.get("nullmx", []):
            self.nullMX(domain, ttl=ttl)
        for domain in zone.get("servfail", []):
            self.servfail(domain)

    # -- serving -------------------------------------------------------------

    @property
    def nameservers(self) -> list:
        """
        C{[(address, port)]}, for L{smartrelay.outbound.router.makeResolver}.
        """
        if self.port is None:
            raise RuntimeError("DNSServer not started")
        return [(self._interface, self.port)]

    @property
    def configValue(self) -> str:
        """
        The C{[delivery] nameservers} configuration value, C{ADDRESS:PORT}.
        """
        (host, port), = self.nameservers
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, attempts: int = 20) -> int:
        """
        Listen on UDP on a port the OS picks, then on TCP on the same port
        number (another port is picked if that one is taken for TCP).

        @return: the port number.
        @raise CannotListenError: if no port works after C{attempts} tries.
        """
        if self.port is not None:
            return self.port
        lastError: Optional[Exception] = None
        for _ in range(attempts):
            udp = self._reactor.listenUDP(
                0, dns.DNSDatagramProtocol(controller=self._factory),
                interface=self._interface,
            )
            port = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(port, self._factory, interface=self._interface)
            except CannotListenError as e:
                lastError = e
                udp.stopListening()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return port
        raise CannotListenError(self._interface, 0, lastError)

    def stop(self) -> defer.Deferred:
        """
        Stop listening and drop open TCP connections.

        @return: a L{Deferred} firing once both ports are closed.
        """
        waiting = []
        for port in (self._udp, self._tcp):
            if port is not None:
                waiting.append(defer.maybeDeferred(port.stopListening))
        for protocol in list(self._factory.connections):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        self._udp = self._tcp = None
        self.port = None
        return defer.gatherResults(waiting).addCallback(lambda _: None)


def loadZone(path: str) -> dict:
    """
    Read a JSON zone file.
    """
    with open(path) as f:
        return json.load(f)


def startProcess(zonePath: str, timeout: float = 30.0) -> tuple:
    """
    Run C{python tests/dnsserver.py --zone zonePath} as a child process
    (this file as a script: it needs Twisted only, not the checkout on the
    import path), from the zone file's folder.

    @return: C{(subprocess.Popen, port)}; stop it with C{process.terminate()}
        (or SIGKILL) and C{process.wait()}.
    @raise RuntimeError: if it does not print its port within C{timeout}.
    """
    zonePath = os.path.abspath(zonePath)
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--zone", zonePath],
        cwd=os.path.dirname(zonePath), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("port "):
        process.kill()
        rest = process.stdout.read()
        process.wait()
        raise RuntimeError(f"tests/dnsserver.py did not start: {line}{rest}")
    return process, int(line.split()[1])


def main(argv: Optional[list] = None) -> None:
    """
    Serve a JSON zone file until SIGTERM/SIGINT; print C{port N} first.
    """
    parser = argparse.ArgumentParser(description="serve a JSON zone on 127.0.0.1")
    parser.add_argument("--zone", required=True, help="JSON zone file")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--log", action="store_true", help="log queries to stderr")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    dnsServer = DNSServer(reactor, interface=args.interface)
    dnsServer.loadZone(loadZone(args.zone))
    if args.log:
        log.startLogging(sys.stderr)
    port = dnsServer.start()
    print(f"port {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
