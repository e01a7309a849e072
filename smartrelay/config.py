"""
Configuration: INI text in, frozen attrs objects out.

L{parseConfig} is the one place that reads and validates the INI file.  Every
section and key it knows is declared once, as a field of L{RelayConfig},
L{SMTPConfig}, L{DeliveryConfig}, L{StoreConfig}, L{FeedbackConfig},
L{TrackingConfig}, L{WebConfig}, L{DomainConfig}, L{ProviderConfig} or
L{DKIMConfig} whose metadata names the function that parses its INI value;
the INI key is the field name.  Unknown sections and unknown keys are
errors, so a typo cannot silently disable a feature.

Named sections such as C{[domain:example.com]}, C{[provider:google]} and
C{[dkim:example.com]} (see L{NAMED_SECTIONS}) may appear any number of
times, once per name; the part after the colon is the section object's
C{name}.

Anything wrong raises L{ConfigError}, whose C{str()} is one line naming the
file, the section, the key and the problem.

Value syntax:
  - durations: C{30s}, C{5m}, C{2h}, C{3d}, C{1w}, or plain seconds (C{90});
  - sizes: C{25M}, C{512K}, C{1G}, or plain bytes; multiples are binary
    (C{1K} = 1024);
  - booleans: C{on}/C{off}, C{yes}/C{no}, C{true}/C{false}, C{1}/C{0};
  - lists: comma-separated (line breaks also separate);
  - rates: C{100/m}, C{10/s}, C{1000/h}, C{5000/d}, C{100/5m} (see L{Rate});
  - percentages: C{10%} or a fraction (C{0.1});
  - an empty value for an optional key means "not set".

Relative paths (C{data_dir}, C{auth_file}, C{tls_certificate}, C{tls_key},
C{tls_ca_certificates}, and C{key} and C{ed25519_key} of C{[dkim:DOMAIN]})
are relative to the current directory of the process, not to the INI file.
"""

import ast
import configparser
import difflib
import ipaddress
import math
import os
import re
import socket
import types
from typing import Any, Callable, Mapping, Optional, Union
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from smartrelay.auth import AuthFileError, PasswordFile

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# ---------------------------------------------------------------------------
# Errors


@attrs.define(auto_exc=True, eq=False)
class ConfigError(Exception):
    """
    The configuration is unusable.

    C{str()} is one line, for example::

        etc/x.ini: [smtp] max_connections: expected a positive integer, got 'abc'

    @ivar problem: what is wrong.
    @ivar source: the file name (or C{"<config>"} for text).
    @ivar section: the INI section, or L{None} if the problem is not in one.
    @ivar key: the key, or L{None} if the problem is not about one key.
    """

    problem: str
    source: str = "<config>"
    section: Optional[str] = None
    key: Optional[str] = None

    def __str__(self) -> str:
        if self.section is None:
            text = f"{self.source}: {self.problem}"
        elif self.key is None:
            text = f"{self.source}: [{self.section}]: {self.problem}"
        else:
            text = f"{self.source}: [{self.section}] {self.key}: {self.problem}"
        return " ".join(text.split())


def _oneLine(text: str) -> str:
    return " ".join(str(text).split())


def _suggest(word: str, candidates) -> str:
    """
    C{" (did you mean 'x'?)"} for the closest candidate, or C{""}.
    """
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


# ---------------------------------------------------------------------------
# Value parsers.  Each takes the INI text and returns the value or raises
# ValueError whose message is the problem (without the location).

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[smhdw]?)"
)


def parseDuration(text: str, allowZero: bool = False) -> float:
    """
    Seconds in a duration such as C{30s}, C{5m}, C{2h}, C{3d}, C{1w} or
    C{90} (plain seconds).  Fractions are allowed (C{1.5h}).

    @param allowZero: accept a zero duration.
    @raise ValueError: for anything else, negative, infinite or (unless
        C{allowZero}) zero values included.
    """
    text = text.strip()
    match = _DURATION_RE.fullmatch(text)
    expected = "expected a duration such as 30s, 5m, 2h, 3d or 1w"
    if match is None:
        raise ValueError(f"{expected}, got {text!r}")
    seconds = float(match["number"]) * _DURATION_UNITS[match["unit"]]
    if not math.isfinite(seconds):
        raise ValueError(f"the duration {text!r} is too long")
    if seconds == 0 and not allowZero:
        raise ValueError(f"{expected} (greater than zero), got {text!r}")
    return seconds


def formatDuration(seconds: float) -> str:
    """
    The shortest text L{parseDuration} reads back as exactly C{seconds}:
    the largest unit that divides it (C{300.0} gives C{5m}), else seconds.
    """
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"cannot format the duration {seconds!r}")
    if seconds == int(seconds):
        whole = int(seconds)
        for unit in "wdhm":
            size = _DURATION_UNITS[unit]
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds!r}s"


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_MAX_SIZE = (1 << 63) - 1


def parseSize(text: str, allowZero: bool = False) -> int:
    """
    Bytes in a size such as C{25M}, C{512K}, C{1G}, C{2T} or C{1000} (plain
    bytes).  Multiples are binary (C{1K} = 1024); letters may be either
    case and may be followed by C{B} or C{iB} (C{25MiB}).

    @param allowZero: accept a zero size.
    @raise ValueError: for anything else.
    """
    text = text.strip()
    match = _SIZE_RE.fullmatch(text)
    expected = "expected a size such as 25M, 512K, 1G or 1000"
    if match is None:
        raise ValueError(f"{expected}, got {text!r}")
    size = int(match["number"]) * _SIZE_UNITS[match["unit"].lower()]
    if size == 0 and not allowZero:
        raise ValueError(f"{expected} (greater than zero), got {text!r}")
    if size > _MAX_SIZE:
        raise ValueError(f"the size {text!r} is too large")
    return size


def formatSize(size: int) -> str:
    """
    The shortest text L{parseSize} reads back as C{size}.
    """
    if size < 0:
        raise ValueError(f"cannot format the size {size!r}")
    for unit in "TGMK":
        multiple = _SIZE_UNITS[unit.lower()]
        if size and size % multiple == 0:
            return f"{size // multiple}{unit}"
    return str(size)


_BOOLEANS = {
    "on": True, "yes": True, "true": True, "1": True,
    "off": False, "no": False, "false": False, "0": False,
}


def parseBool(text: str) -> bool:
    """
    C{on}/C{yes}/C{true}/C{1} or C{off}/C{no}/C{false}/C{0}, any case.

    @raise ValueError: for anything else.
    """
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"expected on or off, got {text.strip()!r}") from None


def _positiveInt(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) == 0:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(text)


#: The most re-wrap worker processes C{[delivery] rewrap_workers} allows.
MAX_REWRAP_WORKERS = 64


def _rewrapWorkers(text: str) -> int:
    """
    C{auto} (one process per CPU but one, at least one and at most four),
    C{0} (threads in the relay process) or a number of processes.
    """
    text = text.strip().lower()
    if text == "auto":
        return min(4, max(1, (os.cpu_count() or 1) - 1))
    if not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_REWRAP_WORKERS:
        raise ValueError(
            f"expected auto or a number of processes from 0 to {MAX_REWRAP_WORKERS}, got {text!r}"
        )
    return int(text)


def _atLeast(minimum: int, why: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _positiveInt(text)
        if value < minimum:
            raise ValueError(f"must be at least {minimum} ({why}), got {value}")
        return value

    return parse


def _port(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def _listItems(text: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def _nonEmpty(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _nodeID(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{2}", text):
        raise ValueError(f"expected two hex digits such as 7F, got {text!r}")
    return int(text, 16)


_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def isHostname(text: str) -> bool:
    """
    Whether C{text} is a valid DNS host name (RFC 1123): dot-separated
    labels of letters, digits and inner hyphens, 63 octets each, 253 in all.
    """
    if not text or len(text) > 253:
        return False
    return all(_LABEL_RE.fullmatch(label) for label in text.split("."))


def _hostname(text: str) -> str:
    text = text.strip()
    if not isHostname(text):
        raise ValueError(f"expected a host name such as mail.example.com, got {text!r}")
    return text


def _defaultHostname() -> str:
    """
    C{socket.getfqdn()}, or C{localhost} if that is not a valid host name.
    """
    name = socket.getfqdn()
    return name if isHostname(name) else "localhost"


def _store(text: str) -> str:
    text = text.strip()
    if text == "sqlite":
        return text
    if text.split("://", 1)[0] in ("redis", "rediss", "unix") and "://" in text:
        from smartrelay.store.redis import parseRedisURL

        parseRedisURL(text)
        return text
    raise ValueError(f"expected 'sqlite' or a redis:// URL, got {text!r}")


def _serverEndpoint(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("expected a server endpoint string such as tcp:2525")
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        raise ValueError(f"invalid server endpoint {text!r}: {_oneLine(e)}") from None
    return text


def _clientEndpoint(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    try:
        clientFromString(MemoryReactor(), text)
    except Exception as e:
        raise ValueError(
            f"invalid client endpoint {text!r}: {_oneLine(e)} "
            "(expected for example tcp:host=smtp.example.com:port=587)"
        ) from None
    return text


def _network(item: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(item, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(
            f"expected an IP address or network such as 10.0.0.0/8, got {item!r}"
        ) from None
    raise ValueError(f"{item!r} has host bits set (did you mean '{loose}'?)")


def _networks(text: str) -> tuple[IPNetwork, ...]:
    return tuple(_network(item) for item in _listItems(text))


def _ipAddress(item: str) -> str:
    try:
        return str(ipaddress.ip_address(item))
    except ValueError:
        raise ValueError(f"expected an IP address, got {item!r}") from None


def _optionalIPAddress(text: str) -> Optional[str]:
    text = text.strip()
    return _ipAddress(text) if text else None


def _nameserver(item: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[(?P<host>[^\]]*)\](?::(?P<port>.*))?", item)
    if match is not None:
        host, port = match["host"], match["port"]
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, None
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"expected an IP address with an optional port such as "
            f"127.0.0.1:10053 or [::1]:53, got {item!r}"
        ) from None
    return (address, 53 if port is None else _port(port))


def _nameservers(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(_nameserver(item) for item in _listItems(text))


def _optionalPositiveInt(text: str) -> Optional[int]:
    return _positiveInt(text) if text.strip() else None


_FRACTION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<percent>%?)")


def parseFraction(text: str) -> float:
    """
    A fraction from 0 to 1 written as a percentage (C{10%}, C{0%},
    C{12.5%}) or as a plain fraction (C{0.1}).

    @raise ValueError: for anything else, values above 100% included.
    """
    text = text.strip()
    match = _FRACTION_RE.fullmatch(text)
    if match is not None:
        value = float(match["number"])
        if match["percent"]:
            value /= 100
        if 0 <= value <= 1:
            return value
    raise ValueError(
        f"expected a percentage between 0% and 100% such as '10%', got {text!r}"
    )


#: The values of the C{tls} keys: opportunistic (STARTTLS when offered, any
#: certificate, plain text otherwise), required (STARTTLS or no delivery,
#: any certificate), verify (STARTTLS with a certificate valid for the MX
#: host name, or no delivery).
TLS_POLICIES = ("opportunistic", "required", "verify")


def _tlsPolicy(text: str) -> str:
    policy = text.strip().lower()
    if policy not in TLS_POLICIES:
        raise ValueError(
            f"expected opportunistic, required or verify, got {text.strip()!r}"
        )
    return policy


def _optionalTLSPolicy(text: str) -> Optional[str]:
    return _tlsPolicy(text) if text.strip() else None


def _domainName(text: str) -> str:
    """
    A DNS domain name: lower-cased, one trailing dot dropped.
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not isHostname(name):
        raise ValueError(f"{text.strip()!r} is not a valid domain name")
    return name


def _providerName(text: str) -> str:
    name = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(
            f"{name!r} is not a valid provider name (use letters, digits, '-' and '_')"
        )
    return name.lower()


def _suffixes(text: str) -> tuple[str, ...]:
    suffixes = []
    for item in _listItems(text):
        suffix = item.lower()
        if suffix.startswith("."):
            suffix = suffix[1:]
        if suffix.endswith("."):
            suffix = suffix[:-1]
        if not isHostname(suffix):
            raise ValueError(f"expected a DNS suffix such as google.com, got {item!r}")
        if suffix not in suffixes:
            suffixes.append(suffix)
    if not suffixes:
        raise ValueError("at least one suffix is needed, such as google.com")
    return tuple(suffixes)


#: The shortest secret accepted for C{[smartrelay] secret}, in characters.
MIN_SECRET_LENGTH = 16


def _secrets(text: str) -> tuple[str, ...]:
    secrets = tuple(_listItems(text))
    for number, secret in enumerate(secrets, 1):
        if len(secret) < MIN_SECRET_LENGTH:
            which = "the secret" if len(secrets) == 1 else f"secret number {number}"
            raise ValueError(
                f"{which} is too short: use at least {MIN_SECRET_LENGTH} characters"
            )
    return secrets


#: The shortest bearer token accepted for C{[web] api_tokens}, in characters.
MIN_API_TOKEN_LENGTH = 24


def _apiTokens(text: str) -> tuple[str, ...]:
    tokens = tuple(_listItems(text))
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_API_TOKEN_LENGTH:
            which = "the token" if len(tokens) == 1 else f"token number {number}"
            raise ValueError(
                f"{which} is too short: use at least {MIN_API_TOKEN_LENGTH} characters"
                " (e.g. from: openssl rand -hex 24)"
            )
        if any(c.isspace() or not c.isprintable() for c in token):
            which = "the token" if len(tokens) == 1 else f"token number {number}"
            raise ValueError(f"{which} must not contain spaces or control characters")
    return tokens


def _optionalDomainName(text: str) -> Optional[str]:
    return _domainName(text) if text.strip() else None


def _verpPrefix(text: str) -> str:
    prefix = text.strip()
    if "+" in prefix:
        raise ValueError(f"must not contain '+' (it separates the token), got {prefix!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,20}", prefix):
        raise ValueError(
            f"expected 1 to 20 letters, digits, '.', '_' or '-', got {prefix!r}"
        )
    return prefix


def _address(item: str) -> str:
    local, at, domain = item.rpartition("@")
    domain = domain.lower().rstrip(".")
    if (
        not at
        or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}", local)
        or not isHostname(domain)
    ):
        raise ValueError(f"expected an address such as fbl@example.com, got {item!r}")
    return local.lower() + "@" + domain


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(_address(item) for item in _listItems(text))


def _baseURL(text: str) -> str:
    url = text.strip()
    expected = f"expected an absolute http or https URL such as https://t.example.com, got {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    if "?" in url or "#" in url:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"must not hold a user name or password, got {url!r}")
    if re.search(r"[^\x21-\x7e]|\\", url):
        raise ValueError(
            f"must be printable ASCII without spaces or backslashes "
            f"(percent-encode the rest), got {url!r}"
        )
    host = parts.hostname
    if not isHostname(host.rstrip(".")):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid host name in {url!r}") from None
    if port == 0:
        raise ValueError(expected)
    return url.rstrip("/")


def _selector(text: str) -> str:
    selector = text.strip()
    if not isHostname(selector):
        raise ValueError(
            f"expected a DKIM selector (DNS labels such as mail or s2024.eu), got {selector!r}"
        )
    return selector


#: The values of C{[dkim:DOMAIN] algorithm}.
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256", "both")


def _dkimAlgorithm(text: str) -> str:
    algorithm = text.strip().lower()
    if algorithm not in DKIM_ALGORITHMS:
        raise ValueError(
            f"expected rsa-sha256, ed25519-sha256 or both, got {text.strip()!r}"
        )
    return algorithm



# ---------------------------------------------------------------------------
# Rates

_RATE_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_RATE_RE = re.compile(
    r"(?P<count>[0-9]+)\s*/\s*"
    r"(?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)?\s*(?P<unit>[A-Za-z]+)"
)


def _checkCount(instance, attribute, count) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the count of a rate must be a positive integer, got {count!r}")


def _checkPeriod(instance, attribute, period) -> None:
    if not (math.isfinite(period) and period > 0):
        raise ValueError(f"the period of a rate must be positive, got {period!r}")


@attrs.frozen
class Rate:
    """
    At most C{count} events per C{period} seconds.

    Written C{COUNT/UNIT} or C{COUNT/NUMBER UNIT}: C{100/m}, C{10/s},
    C{1000/h}, C{5000/d}, C{100/5m}; units may be spelt C{s}/C{sec}/C{second},
    C{m}/C{min}/C{minute}, C{h}/C{hour}, C{d}/C{day} (plurals too), and
    spaces are allowed around C{/}.  C{str()} gives text L{parseRate} reads
    back as an equal rate.

    @ivar count: a positive integer.
    @ivar period: seconds, positive.
    """

    count: int = attrs.field(validator=_checkCount)
    period: float = attrs.field(converter=float, validator=_checkPeriod)

    @property
    def perSecond(self) -> float:
        """
        The sustained rate: C{count / period} events per second.
        """
        return self.count / self.period

    @property
    def burst(self) -> int:
        """
        How many events a token bucket for this rate may let through at
        once: one second's worth, at least 1 and at most C{count}.
        """
        return max(1, min(self.count, math.ceil(self.count / self.period)))

    def __str__(self) -> str:
        period = self.period
        if period == int(period):
            whole = int(period)
            for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
                if whole % size == 0:
                    number = whole // size
                    return f"{self.count}/{unit}" if number == 1 else f"{self.count}/{number}{unit}"
            return f"{self.count}/s" if whole == 1 else f"{self.count}/{whole}s"
        return f"{self.count}/{period!r}s"


def parseRate(text: str) -> Rate:
    """
    Parse a rate such as C{100/m} or C{100/5m} (see L{Rate}).

    @raise ValueError: with a one-line reason, for anything else (a zero
        count or period included).
    """
    text = text.strip()
    expected = "expected a rate such as '100/m' (count per s, m, h or d)"
    match = _RATE_RE.fullmatch(text)
    if match is None or match["unit"].lower() not in _RATE_UNITS:
        raise ValueError(f"{expected}, got {text!r}")
    count = int(match["count"])
    number = 1.0 if match["number"] is None else float(match["number"])
    period = number * _RATE_UNITS[match["unit"].lower()]
    if count == 0 or period == 0 or not math.isfinite(period):
        raise ValueError(f"{expected} with a count and period above zero, got {text!r}")
    return Rate(count, period)


def _optionalRate(text: str) -> Optional[Rate]:
    return parseRate(text) if text.strip() else None


def _failureRate(text: str) -> Optional[Rate]:
    """
    A failure limit such as C{10/15m}, or C{off} (L{None}) for none.
    """
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return parseRate(text)
    except ValueError:
        raise ValueError(
            f"expected failures per period such as '10/15m', or 'off', got {text.strip()!r}"
        ) from None


# ---------------------------------------------------------------------------
# Throttle patterns

#: Regular expressions (searched case-insensitively in the text of a 4xx
#: reply) recognising the big providers' "slow down" replies.
DEFAULT_THROTTLE_PATTERNS: tuple[str, ...] = (
    # Gmail: 4.7.28 "... unusual rate of unsolicited mail ...",
    # "... rate limited ...", "... try again later ...".
    r"\b4\.7\.28\b",
    r"unusual rate",
    r"rate limited",
    # Microsoft: "4.7.500 Server busy. Please try again later",
    # "4.7.650 ... temporarily rate limited due to IP reputation".
    r"\b4\.7\.500 server busy",
    r"temporarily rate limited",
    # Yahoo/AOL: "[TS01] Messages from x temporarily deferred due to
    # unexpected volume or user complaints", "[TSS04]".
    r"\[TS0[1-4]\]",
    r"\bTSS04\b",
    r"temporarily deferred due to unexpected volume",
    # Everybody else.
    r"too many connections",
    r"too many concurrent",
    r"too many messages",
    r"rate limit",
    r"rate-limit",
    r"throttl",
    r"try again later",
    r"exceeded.{0,40}rate",
    r"connection limit",
)


def _compilePatterns(lines) -> tuple["re.Pattern[str]", ...]:
    patterns = []
    for line in lines:
        try:
            patterns.append(re.compile(line, re.IGNORECASE))
        except re.error as e:
            raise ValueError(f"bad regular expression {line!r}: {_oneLine(e)}") from None
    return tuple(patterns)


def _throttlePatterns(text: str) -> tuple["re.Pattern[str]", ...]:
    return _compilePatterns(line.strip() for line in text.split("\n") if line.strip())


# ---------------------------------------------------------------------------
# Retry schedules

_STEP_RE = re.compile(r"(?P<delay>[^*]+?)\s*(?:\*\s*(?P<count>\S+))?")


def _checkSteps(instance, attribute, steps) -> None:
    if not steps:
        raise ValueError("a retry schedule needs at least one delay")
    for index, step in enumerate(steps):
        delay, count = step
        if not (isinstance(delay, (int, float)) and math.isfinite(delay) and delay > 0):
            raise ValueError(f"retry delays must be positive, got {delay!r}")
        if count is None:
            if index != len(steps) - 1:
                raise ValueError("only the last retry delay can repeat forever")
        elif not (isinstance(count, int) and count >= 1):
            raise ValueError(f"retry counts must be positive integers, got {count!r}")


@attrs.frozen
class RetrySchedule:
    """
    How long to wait before each new delivery attempt.

    Written as a comma-separated list of durations, C{X*N} standing for N
    times X and C{X*...} for X forever (only last): C{5m, 10m, 20m, 40m,
    1h*4, 2h*...}.  Without a final C{*...} the last delay repeats forever.
    C{str()} gives text that L{parse} reads back as an equal schedule.

    @ivar steps: (delay in seconds, count) pairs; count L{None} means forever.
    """

    steps: tuple[tuple[float, Optional[int]], ...] = attrs.field(
        converter=lambda steps: tuple((float(d), c) for d, c in steps),
        validator=_checkSteps,
    )

    @classmethod
    def parse(cls, text: str) -> "RetrySchedule":
        """
        Parse the schedule syntax; raise L{ValueError} with a one-line reason.
        """
        items = _listItems(text)
        if not items:
            raise ValueError(
                "expected a list of durations such as '5m, 10m, 1h*4, 2h*...', got ''"
            )
        steps: list[tuple[float, Optional[int]]] = []
        for index, item in enumerate(items):
            match = _STEP_RE.fullmatch(item)
            if match is None:
                raise ValueError(f"expected a duration or DURATION*COUNT, got {item!r}")
            delay = parseDuration(match["delay"])
            count: Optional[int]
            if match["count"] is None:
                count = 1
            elif match["count"] == "...":
                if index != len(items) - 1:
                    raise ValueError(
                        f"{item!r} repeats forever, so nothing may follow it"
                    )
                count = None
            else:
                try:
                    count = _positiveInt(match["count"])
                except ValueError:
                    raise ValueError(
                        f"expected a positive count or '...' after '*', got {item!r}"
                    ) from None
            steps.append((delay, count))
        return cls(tuple(steps))

    def __str__(self) -> str:
        parts = []
        for delay, count in self.steps:
            text = formatDuration(delay)
            if count is None:
                text += "*..."
            elif count != 1:
                text += f"*{count}"
            parts.append(text)
        return ", ".join(parts)

    def delay(self, attempt: int) -> float:
        """
        Seconds to wait after failed attempt number C{attempt} (1 = the first
        attempt) before trying again.
        """
        if attempt < 1:
            raise ValueError(f"attempts are numbered from 1, got {attempt!r}")
        remaining = attempt
        for delay, count in self.steps:
            if count is None or remaining <= count:
                return delay
            remaining -= count
        return self.steps[-1][0]


def _retry(text: str) -> RetrySchedule:
    return RetrySchedule.parse(text)


DEFAULT_RETRY = RetrySchedule.parse("5m, 10m, 20m, 40m, 1h*4, 2h*...")


# ---------------------------------------------------------------------------
# Files named by the configuration


def _authFile(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    try:
        PasswordFile.load(text)
    except AuthFileError as e:
        raise ValueError(str(e)) from None
    return text


def _readPEM(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from None


def _loadCertificates(path: str) -> list:
    data = _readPEM(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path!r} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"{path!r} holds a bad PEM certificate: {_oneLine(e)}") from None


def _loadPrivateKey(path: str):
    data = _readPEM(path)
    match = re.search(
        rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----",
        data,
        re.DOTALL,
    )
    if match is None:
        raise ValueError(f"{path!r} holds no PEM private key")
    if match.group(1) == b"ENCRYPTED " or b"ENCRYPTED" in match.group(0):
        raise ValueError(f"{path!r} holds an encrypted key; smartrelay needs it unencrypted")
    try:
        return load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path!r} holds a bad PEM private key: {_oneLine(e)}") from None


def _optionalPath(text: str) -> Optional[str]:
    return text.strip() or None


def _caCertificates(text: str) -> Optional[str]:
    path = text.strip()
    if not path:
        return None
    _loadCertificates(path)
    return path


def _checkTLS(smtp: "SMTPConfig") -> Optional[tuple[str, str]]:
    """
    Both or neither TLS files; both PEM; the key belongs to the certificate.
    Returns (key, problem) or L{None}.
    """
    certificate, key = smtp.tls_certificate, smtp.tls_key
    if certificate is None and key is None:
        return None
    if key is None:
        return ("tls_key", "required when tls_certificate is set")
    if certificate is None:
        return ("tls_certificate", "required when tls_key is set")
    try:
        certificates = _loadCertificates(certificate)
    except ValueError as e:
        return ("tls_certificate", str(e))
    try:
        privateKey = _loadPrivateKey(key)
    except ValueError as e:
        return ("tls_key", str(e))

    def spki(publicKey) -> bytes:
        return publicKey.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(certificates[0].public_key()) != spki(privateKey.public_key()):
        return ("tls_key", f"the key in {key!r} does not match the certificate in {certificate!r}")
    return None


#: The smallest RSA key accepted for DKIM, in bits.
MIN_DKIM_RSA_BITS = 1024


def _checkDKIMKey(path: str, algorithm: str) -> Optional[str]:
    """
    Load the PEM private key at C{path} and check that it fits the DKIM
    C{algorithm} (C{rsa-sha256}: RSA of at least L{MIN_DKIM_RSA_BITS}
    bits; C{ed25519-sha256}: Ed25519).  Returns the problem or L{None}.
    """
    try:
        key = _loadPrivateKey(path)
    except ValueError as e:
        return str(e)
    if isinstance(key, rsa.RSAPrivateKey):
        if algorithm != "rsa-sha256":
            return f"{path!r} holds an RSA key, but {algorithm} needs an Ed25519 key"
        if key.key_size < MIN_DKIM_RSA_BITS:
            return (
                f"{path!r} holds a {key.key_size}-bit RSA key; "
                f"use at least {MIN_DKIM_RSA_BITS} bits (2048 recommended)"
            )
        return None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if algorithm != "ed25519-sha256":
            return f"{path!r} holds an Ed25519 key, but {algorithm} needs an RSA key"
        return None
    return f"{path!r} holds neither an RSA nor an Ed25519 key"


def _checkDKIM(dkim: "DKIMConfig") -> Optional[tuple[str, str]]:
    """
    The keys exist, are RSA or Ed25519 as the algorithm says, and the
    C{ed25519_*} keys are set exactly when the algorithm is C{both}.
    Returns (key, problem) or L{None}.
    """
    if dkim.algorithm == "both":
        for key in ("ed25519_selector", "ed25519_key"):
            if getattr(dkim, key) is None:
                return (key, "required when algorithm = both")
        rsaAlgorithm = "rsa-sha256"
    else:
        for key in ("ed25519_selector", "ed25519_key"):
            if getattr(dkim, key) is not None:
                return (key, f"only used with algorithm = both, not {dkim.algorithm}")
        rsaAlgorithm = dkim.algorithm
    problem = _checkDKIMKey(dkim.key, rsaAlgorithm)
    if problem is not None:
        return ("key", problem)
    if dkim.ed25519_key is not None:
        problem = _checkDKIMKey(dkim.ed25519_key, "ed25519-sha256")
        if problem is not None:
            return ("ed25519_key", problem)
    return None


# ---------------------------------------------------------------------------
# The configuration objects

_PARSE = "smartrelay.config.parse"


def _setting(parse: Callable[[str], Any], **kwargs) -> Any:
    """
    A field that an INI key of the same name sets, parsed by C{parse}.
    """
    return attrs.field(metadata={_PARSE: parse}, **kwargs)


def _defaultNetworks() -> tuple[IPNetwork, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@attrs.frozen(kw_only=True)
class RelayConfig:
    """
    Section C{[smartrelay]}: the node itself.

    @ivar data_dir: the spool and the SQLite file live here (relative to the
        current directory unless absolute).
    @ivar node_id: 0-255, two hex digits in the INI file; first field of
        every queue id.
    @ivar hostname: the name in the SMTP banner and EHLO.
    @ivar store: C{sqlite} (the only store in this version).
    @ivar secret: secrets (comma-separated in the INI file, each at least
        L{MIN_SECRET_LENGTH} characters) from which the keys of signed
        tokens (VERP, unsubscribe and tracking links; see
        L{smartrelay.tokens.Tokens.load}) are derived: the first signs,
        every one verifies, so a new secret can be put in front of the old
        ones.  Empty (the default) means a random key kept in
        C{data_dir/token-keys}; nodes sharing a store need the same
        secrets.  Left out of the C{repr}.
    @ivar log_messages: write a log line for each accepted message and for
        each delivery attempt's outcome (L{smartrelay.logs.MessageLog}).
    """

    data_dir: str = _setting(_nonEmpty, default="var")
    node_id: int = _setting(_nodeID, default=0)
    hostname: str = _setting(_hostname, factory=_defaultHostname)
    store: str = _setting(_store, default="sqlite")
    secret: tuple[str, ...] = _setting(_secrets, default=(), repr=False)
    log_messages: bool = _setting(parseBool, default=True)
    #: Seconds a connection-slot lease (and a node's heartbeat) lives
    #: without renewal: a dead node's slots come back this soon
    #: (L{smartrelay.cluster.leases}).
    lease_ttl: float = _setting(parseDuration, default=30.0)
    #: With a Redis store: how old the node's local copy of the suppression
    #: list may be and still be checked against while Redis cannot be
    #: reached; past it recipients are held (L{smartrelay.cluster.replica}).
    suppression_max_staleness: float = _setting(parseDuration, default=600.0)


@attrs.frozen(kw_only=True)
class SMTPConfig:
    """
    Section C{[smtp]}: the submission server.

    @ivar allowed_clients: networks that may submit without SMTP AUTH.
    @ivar auth_file: a password file (see L{smartrelay.auth}) enabling SMTP
        AUTH, or L{None}.
    @ivar tls_certificate: PEM certificate (chain) for STARTTLS, or L{None}.
    @ivar tls_key: PEM private key for it, or L{None}.
    @ivar max_message_size: bytes.
    @ivar max_line_length: octets, not counting CRLF.
    @ivar command_timeout: seconds to wait for a command.
    @ivar data_timeout: seconds allowed for the whole DATA phase.
    @ivar auth_client_failures: failed AUTH attempts a client address (an
        IPv6 client's C{/64}) may make in a period before it is locked out
        (a L{Rate}), or L{None} for no limit; see L{smartrelay.ratelimit}.
    @ivar auth_user_failures: the same for one user name over all clients
        that have not logged in as that user lately, or L{None}.
    @ivar auth_lockout: seconds a locked-out client or user name is refused.
    @ivar auth_failure_delay: seconds before answering a failed AUTH,
        doubling with each recent failure of the client up to 15 s.
    """

    listen: str = _setting(_serverEndpoint, default="tcp:2525:interface=127.0.0.1")
    allowed_clients: tuple[IPNetwork, ...] = _setting(_networks, factory=_defaultNetworks)
    auth_file: Optional[str] = _setting(_authFile, default=None)
    tls_certificate: Optional[str] = _setting(_optionalPath, default=None)
    tls_key: Optional[str] = _setting(_optionalPath, default=None)
    max_connections: int = _setting(_positiveInt, default=1000)
    max_connections_per_client: int = _setting(_positiveInt, default=100)
    max_message_size: int = _setting(parseSize, default=25 * 1024 * 1024)
    max_recipients: int = _setting(_positiveInt, default=1000)
    max_line_length: int = _setting(
        _atLeast(998, "RFC 5321 section 4.5.3.1.6"), default=998
    )
    command_timeout: float = _setting(parseDuration, default=300.0)
    data_timeout: float = _setting(parseDuration, default=600.0)
    auth_client_failures: Optional[Rate] = _setting(_failureRate, default=Rate(10, 900))
    auth_user_failures: Optional[Rate] = _setting(_failureRate, default=Rate(100, 3600))
    auth_lockout: float = _setting(parseDuration, default=900.0)
    auth_failure_delay: float = _setting(
        lambda text: parseDuration(text, allowZero=True), default=1.0
    )


@attrs.frozen(kw_only=True)
class DeliveryConfig:
    """
    Section C{[delivery]}: outbound mail.

    @ivar smarthost: a client endpoint string to relay everything through,
        or L{None} to deliver to each domain's MX.
    @ivar nameservers: (IP address, port) pairs; empty means the system's.
    @ivar retry: waits between delivery attempts.
    @ivar max_age: seconds after which an undelivered message expires.
    @ivar bind_address: local IP address for outgoing connections, or L{None}.
    @ivar connect_timeout: seconds to wait for a TCP connection.
    @ivar timeout: seconds to wait for each SMTP reply.
    @ivar hold: accept and queue mail but start no delivery attempts.
    @ivar messages_per_connection: most SMTP transactions (messages) sent
        over one pooled connection before it is closed.
    @ivar max_connections_per_domain: most simultaneous connections to one
        destination, unless its C{[domain:...]} or C{[provider:...]}
        section says otherwise.
    @ivar idle_timeout: seconds a pooled connection with no work stays open.
    @ivar retry_jitter: fraction from 0 to 1 (C{10%} in the INI file) by
        which each retry wait is randomly lengthened or shortened.
    @ivar tls: the default TLS policy for every destination, one of
        L{TLS_POLICIES} (lower-case).
    @ivar tls_ca_certificates: a PEM file of CA certificates trusted for
        C{tls = verify}, or L{None} for the system's trust store.  Checked
        to hold at least one certificate when the configuration is read.
    @ivar throttle_patterns: compiled case-insensitive regular expressions
        (one per line in the INI file) searched in the text of a 4xx reply
        to recognise "slow down" replies; a 421 reply always counts.  Empty
        means only 421 replies count.
    @ivar throttle_cooldown: seconds to slow down for after a throttling reply.
    @ivar shutdown_timeout: seconds a stop waits for SMTP sessions to finish
        their message, then for deliveries in flight.
    @ivar rewrap_workers: worker processes that re-wrap and DKIM-sign
        outgoing messages (L{smartrelay.engine.workers}); 0 does it in a
        thread pool of the relay process.  C{auto} in the INI file (the
        default) is one per CPU but one, from 1 to 4.
    """

    smarthost: Optional[str] = _setting(_clientEndpoint, default=None)
    nameservers: tuple[tuple[str, int], ...] = _setting(_nameservers, default=())
    mx_port: int = _setting(_port, default=25)
    max_connections: int = _setting(_positiveInt, default=50)
    retry: RetrySchedule = _setting(_retry, default=DEFAULT_RETRY)
    max_age: float = _setting(parseDuration, default=3 * 86400.0)
    bind_address: Optional[str] = _setting(_optionalIPAddress, default=None)
    connect_timeout: float = _setting(parseDuration, default=30.0)
    timeout: float = _setting(parseDuration, default=300.0)
    hold: bool = _setting(parseBool, default=False)
    messages_per_connection: int = _setting(_positiveInt, default=100)
    max_connections_per_domain: int = _setting(_positiveInt, default=20)
    idle_timeout: float = _setting(parseDuration, default=30.0)
    retry_jitter: float = _setting(parseFraction, default=0.1)
    tls: str = _setting(_tlsPolicy, default="opportunistic")
    tls_ca_certificates: Optional[str] = _setting(_caCertificates, default=None)
    throttle_patterns: tuple["re.Pattern[str]", ...] = _setting(
        _throttlePatterns, factory=lambda: _compilePatterns(DEFAULT_THROTTLE_PATTERNS)
    )
    throttle_cooldown: float = _setting(parseDuration, default=300.0)
    shutdown_timeout: float = _setting(parseDuration, default=30.0)
    rewrap_workers: int = _setting(_rewrapWorkers, factory=lambda: _rewrapWorkers("auto"))


@attrs.frozen(kw_only=True)
class StoreConfig:
    """
    Section C{[store]}: the state store's housekeeping.

    @ivar retention: seconds events are kept; older ones are pruned in the
        background (statistics counters are kept).
    """

    retention: float = _setting(parseDuration, default=30 * 86400.0)


@attrs.frozen(kw_only=True)
class FeedbackConfig:
    """
    Section C{[feedback]}: mail coming back (bounces, complaints,
    unsubscribe mails) and the addresses it comes back to.

    Outgoing mail has the envelope sender (VERP) C{VERP_PREFIX+TOKEN@DOMAIN}
    and a C{mailto:unsub+TOKEN@DOMAIN} unsubscribe address, DOMAIN being
    L{bounce_domain} (see L{smartrelay.tokens}).

    @ivar listen: server endpoint string for the feedback SMTP server
        (L{smartrelay.smtp.feedback}), which receives mail to those
        addresses, to C{postmaster@DOMAIN} and to L{fbl_addresses}.  It
        uses the C{[smtp]} TLS certificate, line length and timeouts.
    @ivar bounce_domain: the domain of those addresses (lower-case, without
        a trailing dot), or L{None} for the C{[smartrelay] hostname}.  Its
        MX must point at the feedback server.
    @ivar verp_prefix: the local part before C{+TOKEN} in the envelope
        sender: 1 to 20 letters, digits, C{.}, C{_} or C{-} (no C{+}).
    @ivar fbl_addresses: addresses (lower-case) that feedback-loop reports
        (ARF complaints) are sent to, at any domain whose MX is the
        feedback server.
    @ivar max_message_size: bytes; a bigger report is refused.
    @ivar max_connections: most simultaneous feedback connections.
    @ivar max_connections_per_client: the same from one client address.
    @ivar soft_bounce_limit: this many soft bounces of one address within
        L{soft_bounce_window} seconds put it on the suppression list.
    @ivar soft_bounce_window: seconds.
    """

    listen: str = _setting(_serverEndpoint, default="tcp:2526:interface=127.0.0.1")
    bounce_domain: Optional[str] = _setting(_optionalDomainName, default=None)
    verp_prefix: str = _setting(_verpPrefix, default="bounce")
    fbl_addresses: tuple[str, ...] = _setting(_addresses, default=())
    max_message_size: int = _setting(parseSize, default=10 * 1024 * 1024)
    max_connections: int = _setting(_positiveInt, default=200)
    max_connections_per_client: int = _setting(_positiveInt, default=20)
    soft_bounce_limit: int = _setting(_positiveInt, default=5)
    soft_bounce_window: float = _setting(parseDuration, default=30 * 86400.0)


@attrs.frozen(kw_only=True)
class TrackingConfig:
    """
    Section C{[tracking]}: links added to outgoing mail.  A message's
    C{X-SmartRelay-Track} and C{X-SmartRelay-Unsubscribe} headers override
    L{opens}, L{clicks} and L{unsubscribe}.

    @ivar base_url: the absolute http(s) URL under which the web server
        (C{[web] listen}, usually behind a proxy) is reached from the
        recipients' mail clients, without a query or fragment and without a
        trailing slash: C{BASE/t/o/TOKEN.gif}, C{BASE/t/c/TOKEN},
        C{BASE/u/TOKEN}.
    @ivar opens: add an open-tracking pixel to HTML parts by default.
    @ivar clicks: rewrite http(s) links in HTML parts to tracked
        redirects by default.
    @ivar unsubscribe: add C{List-Unsubscribe} (https and mailto) and
        C{List-Unsubscribe-Post} headers by default.
    """

    base_url: str = _setting(_baseURL, default="http://127.0.0.1:8080")
    opens: bool = _setting(parseBool, default=False)
    clicks: bool = _setting(parseBool, default=False)
    unsubscribe: bool = _setting(parseBool, default=True)


def _accessLog(text: str) -> str:
    text = text.strip()
    if text in ("log", "off"):
        return text
    if not text:
        raise ValueError("expected log, off or a file path")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise ValueError(f"the directory of {text!r} does not exist")
    if os.path.isdir(text):
        raise ValueError(f"{text!r} is a directory")
    if not os.access(text if os.path.exists(text) else directory, os.W_OK):
        raise ValueError(f"{text!r} cannot be written")
    return text


@attrs.frozen(kw_only=True)
class WebConfig:
    """
    Section C{[web]}: the HTTP site (tracking, unsubscribe, API, reports).

    @ivar listen: server endpoint string for the web server.
    @ivar api_tokens: the bearer tokens the HTTP API accepts
        (comma-separated in the INI file, each at least
        L{MIN_API_TOKEN_LENGTH} characters); none: the API is disabled.
        Left out of the C{repr}.
    @ivar trusted_proxies: networks of the reverse proxies whose
        C{X-Forwarded-For} is believed (for the API's failure limits and
        the C{ip} of open and click events); empty: the peer address is
        the client.
    @ivar metrics_clients: networks of the clients that may read
        C{/metrics} and C{/healthz} (loopback unless set; empty: nobody).
    @ivar access_log: where the site's access log goes: C{log} (the
        relay's log), C{off}, or a file path (written in batches; see
        L{smartrelay.web.accesslog}).
    @ivar users_file: the password file (C{smartrelay passwd FILE USER},
        the format of C{[smtp] auth_file}) of the reports UI's users, or
        L{None}: nobody can log in.
    @ivar session_timeout: seconds a UI session may stay idle.
    @ivar session_lifetime: seconds a UI session lasts at most.
    """

    listen: str = _setting(_serverEndpoint, default="tcp:8080:interface=127.0.0.1")
    api_tokens: tuple[str, ...] = _setting(_apiTokens, default=(), repr=False)
    trusted_proxies: tuple[IPNetwork, ...] = _setting(_networks, default=())
    metrics_clients: tuple[IPNetwork, ...] = _setting(_networks, factory=_defaultNetworks)
    access_log: str = _setting(_accessLog, default="log")
    # The reports UI (issue 14): who may log in, how long a session lasts.
    users_file: Optional[str] = _setting(_authFile, default=None)
    session_timeout: float = _setting(parseDuration, default=3600.0)
    session_lifetime: float = _setting(parseDuration, default=12 * 3600.0)


_NAME = "smartrelay.config.name"


def _sectionName(parse: Callable[[str], str]) -> Any:
    """
    The C{name} field of a named section's class: the part of the section
    header after the colon, parsed (and normalised) by C{parse}, which
    raises L{ValueError} if it is not a valid name.
    """
    return attrs.field(metadata={_NAME: parse})


@attrs.frozen(kw_only=True)
class DomainConfig:
    """
    Section C{[domain:NAME]}: how to deliver to one recipient domain.

    Every key is optional; L{None} (not set) means "as for every other
    domain", i.e. the provider's setting if its MX host matches a
    C{[provider:...]} section, else the C{[delivery]} setting.

    @ivar name: the domain, lower-case, without a trailing dot.
    @ivar max_connections: most simultaneous connections for this domain.
    @ivar rate: most messages (transactions) sent to this domain per period.
    @ivar route: a client endpoint string to deliver this domain's mail
        through instead of its MX hosts (or the smarthost).
    @ivar tls: TLS policy, one of L{TLS_POLICIES}.
    @ivar messages_per_connection: most transactions per connection.
    """

    name: str = _sectionName(_domainName)
    max_connections: Optional[int] = _setting(_optionalPositiveInt, default=None)
    rate: Optional[Rate] = _setting(_optionalRate, default=None)
    route: Optional[str] = _setting(_clientEndpoint, default=None)
    tls: Optional[str] = _setting(_optionalTLSPolicy, default=None)
    messages_per_connection: Optional[int] = _setting(_optionalPositiveInt, default=None)


@attrs.frozen(kw_only=True)
class ProviderConfig:
    """
    Section C{[provider:NAME]}: limits for a mailbox provider, recognised
    by its MX host names, shared by every domain whose mail it receives.

    The optional keys (L{None} if not set) are as in L{DomainConfig}; a
    C{[domain:...]} setting wins over a provider's.

    @ivar name: letters, digits, C{-} and C{_}, lower-case.
    @ivar mx_suffixes: DNS suffixes (lower-case, without leading or
        trailing dots) of the provider's MX host names; required.
    @ivar max_connections: most simultaneous connections to the provider.
    @ivar rate: most messages (transactions) sent to the provider per period.
    @ivar tls: TLS policy, one of L{TLS_POLICIES}.
    @ivar messages_per_connection: most transactions per connection.
    """

    name: str = _sectionName(_providerName)
    mx_suffixes: tuple[str, ...] = _setting(_suffixes)
    max_connections: Optional[int] = _setting(_optionalPositiveInt, default=None)
    rate: Optional[Rate] = _setting(_optionalRate, default=None)
    tls: Optional[str] = _setting(_optionalTLSPolicy, default=None)
    messages_per_connection: Optional[int] = _setting(_optionalPositiveInt, default=None)

    def matchLength(self, host: str) -> int:
        """
        The length of the longest of L{mx_suffixes} that C{host} equals or
        ends with (after a dot), or 0 if none does.  Case and one trailing
        dot are ignored.
        """
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        return max(
            (
                len(suffix)
                for suffix in self.mx_suffixes
                if host == suffix or host.endswith("." + suffix)
            ),
            default=0,
        )

    def matches(self, host: str) -> bool:
        """
        Whether the MX host name C{host} belongs to this provider: it equals
        one of L{mx_suffixes} or ends with a dot and one of them.  Case and
        one trailing dot are ignored.
        """
        return self.matchLength(host) > 0


@attrs.frozen(kw_only=True)
class DKIMConfig:
    """
    Section C{[dkim:DOMAIN]}: how to DKIM-sign mail whose From address is
    in DOMAIN.

    The key files are read when the configuration is: they must be
    unencrypted PEM private keys, RSA of at least L{MIN_DKIM_RSA_BITS} bits
    for C{rsa-sha256}, Ed25519 for C{ed25519-sha256}.

    @ivar name: the domain, lower-case, without a trailing dot.
    @ivar selector: the selector (DNS labels) of L{key}; required.
    @ivar key: path of the private key; required.
    @ivar algorithm: one of L{DKIM_ALGORITHMS}: C{rsa-sha256} (L{key} is
        RSA), C{ed25519-sha256} (L{key} is Ed25519) or C{both} (L{key} is
        RSA, and L{ed25519_key} with L{ed25519_selector} signs too).
    @ivar ed25519_selector: with C{both} (required there, refused
        otherwise): the selector of L{ed25519_key}.
    @ivar ed25519_key: with C{both} (required there, refused otherwise):
        path of the Ed25519 private key.
    """

    name: str = _sectionName(_domainName)
    selector: str = _setting(_selector)
    key: str = _setting(_nonEmpty)
    algorithm: str = _setting(_dkimAlgorithm, default="rsa-sha256")
    ed25519_selector: Optional[str] = _setting(
        lambda text: _selector(text) if text.strip() else None, default=None
    )
    ed25519_key: Optional[str] = _setting(_optionalPath, default=None)

    def signingKeys(self) -> list[tuple[str, str, str]]:
        """
        The signatures to add: (algorithm, selector, key path) for each,
        C{rsa-sha256} first when there are two.
        """
        if self.algorithm == "both":
            assert self.ed25519_selector is not None and self.ed25519_key is not None
            return [
                ("rsa-sha256", self.selector, self.key),
                ("ed25519-sha256", self.ed25519_selector, self.ed25519_key),
            ]
        return [(self.algorithm, self.selector, self.key)]


# -- [export] and [webhooks] (issue 16) ---------------------------------------


def _exportFormat(text: str) -> str:
    text = text.strip().lower()
    if text not in ("jsonl", "csv"):
        raise ValueError(f"expected jsonl or csv, got {text!r}")
    return text


def _command(text: str) -> Optional[tuple[str, ...]]:
    import shlex

    if not text.strip():
        return None
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"cannot split into words ({e})") from None
    return words


def _eventTypes(text: str) -> tuple[str, ...]:
    from smartrelay.events import EVENT_TYPES

    items = _listItems(text)
    if not items or items == ["all"]:
        return ()
    for item in items:
        if item not in EVENT_TYPES:
            raise ValueError(
                f"unknown event type {item!r}{_suggest(item, EVENT_TYPES)}"
                " (or 'all')"
            )
    return tuple(dict.fromkeys(items))


def _webhookURL(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    from smartrelay.ssrf import checkURL

    # Scheme and form only; private targets are checked with
    # allow_private (_checkWebhooks).
    checkURL(text, allowPrivate=True)
    return text


def _webhookSecret(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if len(text) < MIN_WEBHOOK_SECRET_LENGTH:
        raise ValueError(
            f"must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters"
            f" (got {len(text)})"
        )
    return text


def _webhookBatch(text: str) -> int:
    value = _positiveInt(text)
    if value > 1000:
        raise ValueError(f"expected 1 to 1000, got {value}")
    return value


#: The shortest C{[webhooks] secret} accepted.
MIN_WEBHOOK_SECRET_LENGTH = 16


@attrs.frozen(kw_only=True)
class ExportConfig:
    """
    Section C{[export]}: event files (L{smartrelay.export.exporter}).

    @ivar directory: where the files go (created if missing; relative to
        the current directory); L{None}: no export.
    @ivar format: C{jsonl} (one event object a line) or C{csv}.
    @ivar interval: seconds between files; an interval without events
        writes none.
    @ivar gzip: compress each file (name ends in C{.gz}).
    @ivar command: a program (and its first arguments) run after each new
        file with the file's path as its last argument; a failure is
        logged and retried.
    @ivar command_timeout: seconds the command may run before it is
        killed (and retried).
    """

    directory: Optional[str] = _setting(_optionalPath, default=None)
    format: str = _setting(_exportFormat, default="jsonl")
    interval: float = _setting(parseDuration, default=300.0)
    gzip: bool = _setting(parseBool, default=False)
    command: Optional[tuple[str, ...]] = _setting(_command, default=None)
    command_timeout: float = _setting(parseDuration, default=600.0)


@attrs.frozen(kw_only=True)
class WebhooksConfig:
    """
    Section C{[webhooks]}: signed POSTs of events
    (L{smartrelay.export.webhooks}, DESIGN section 1.7b).

    @ivar url: the receiver, http(s); L{None}: no webhooks.
    @ivar secret: the HMAC-SHA256 key of the C{X-SmartRelay-Signature}
        header (required with C{url}); left out of the C{repr}.
    @ivar events: the event types sent; empty: all.
    @ivar allow_private: let C{url} be a loopback, private or link-local
        address (refused otherwise, at start-up and at every connection).
    @ivar batch: most events per POST.
    @ivar max_age: seconds a batch is retried before it is given up.
    @ivar timeout: seconds a POST may take.
    @ivar concurrency: POSTs in flight at once.
    """

    url: Optional[str] = _setting(_webhookURL, default=None)
    secret: Optional[str] = _setting(_webhookSecret, default=None, repr=False)
    events: tuple[str, ...] = _setting(_eventTypes, default=())
    allow_private: bool = _setting(parseBool, default=False)
    batch: int = _setting(_webhookBatch, default=100)
    max_age: float = _setting(parseDuration, default=3 * 86400.0)
    timeout: float = _setting(parseDuration, default=30.0)
    concurrency: int = _setting(_webhookBatch, default=4)


def _checkWebhooks(webhooks: "WebhooksConfig") -> Optional[tuple[str, str]]:
    if webhooks.url is None:
        return None
    from smartrelay.ssrf import URLRefused, checkURL

    try:
        checkURL(webhooks.url, webhooks.allow_private)
    except URLRefused as e:
        return ("url", str(e))
    if not webhooks.secret:
        return ("secret", "required with url (at least 16 characters)")
    return None


# -- [sms] (issue 15) ----------------------------------------------------------

_SMS_SOURCE_RE = re.compile(r"\+?[0-9]{1,15}|(?=.*[A-Za-z])[A-Za-z0-9 ._&'-]{1,11}")


def _smsSource(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if not _SMS_SOURCE_RE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a sender id: an E.164 number (+393331234567), a short "
            "code, or 1 to 11 letters, digits, spaces and ._&'- with a letter"
        )
    return text


def _smppString(limit: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if len(text) > limit or not all(" " <= c <= "~" for c in text):
            raise ValueError(f"must be at most {limit} printable ASCII characters")
        return text

    return parse


def _smsRate(text: str) -> Optional[float]:
    text = text.strip()
    if not text or text.lower() == "off":
        return None
    try:
        rate = float(text.removesuffix("/s"))
    except ValueError:
        raise ValueError(f"{text!r} is not a number of submits per second (e.g. 50)") from None
    if not rate > 0 or rate == float("inf"):
        raise ValueError("must be a positive number of submits per second")
    return rate


def _maxParts(text: str) -> int:
    value = _positiveInt(text)
    if value > 255:
        raise ValueError("must be 1 to 255 (a concatenated SMS has at most 255 parts)")
    return value


def _subjectMode(text: str) -> str:
    text = text.strip().lower()
    if text not in ("prepend", "ignore"):
        raise ValueError("must be prepend or ignore")
    return text


@attrs.frozen(kw_only=True)
class SMSConfig:
    """
    Section C{[sms]}: mail to C{+E164@DOMAIN} goes out as SMS over SMPP 3.4
    (L{smartrelay.sms}, DESIGN section 1.8).

    @ivar domain: the recipient domain of SMS; L{None}: no SMS.
    @ivar smsc: client endpoint string of the SMSC (C{tcp:host=...:port=2775},
        C{tls:...}); required with C{domain}.
    @ivar system_id: the bind's system_id (at most 15 characters).
    @ivar password: the bind's password (at most 8); left out of the C{repr}.
    @ivar system_type: the bind's system_type (at most 12).
    @ivar source_addr: the default sender id (an E.164 number, a short code
        or up to 11 letters and digits); a message's
        C{X-SmartRelay-SMS-From} overrides it.
    @ivar window: submit_sm sent and not yet answered, at most.
    @ivar rate: submit_sm per second, at most (C{off}: no limit).
    @ivar max_parts: most parts one SMS may take (a longer text is refused
        with C{554 5.3.4} at the end of DATA).
    @ivar subject: C{prepend} the Subject to the text, or C{ignore} it.
    @ivar response_timeout: seconds to wait for an answer from the SMSC
        before the session is given up (and its unanswered submits sent
        again on the next one).
    @ivar enquire_link: seconds without traffic before an enquire_link.
    @ivar queue_timeout: seconds a message waits for a bound session
        before its delivery is deferred.
    @ivar max_binds: binds to the SMSC at most across every node sharing
        the store (issue 17: a lease on C{sms-bind:<smsc>} per bind);
        L{None} (not set): no cluster-wide limit, one bind per node.
    """

    domain: Optional[str] = _setting(_optionalDomainName, default=None)
    smsc: Optional[str] = _setting(_clientEndpoint, default=None)
    system_id: str = _setting(_smppString(15), default="")
    password: str = _setting(_smppString(8), default="", repr=False)
    system_type: str = _setting(_smppString(12), default="")
    source_addr: Optional[str] = _setting(_smsSource, default=None)
    window: int = _setting(_positiveInt, default=10)
    rate: Optional[float] = _setting(_smsRate, default=None)
    max_parts: int = _setting(_maxParts, default=5)
    subject: str = _setting(_subjectMode, default="ignore")
    response_timeout: float = _setting(parseDuration, default=30.0)
    enquire_link: float = _setting(parseDuration, default=30.0)
    queue_timeout: float = _setting(parseDuration, default=60.0)
    max_binds: Optional[int] = _setting(_optionalPositiveInt, default=None)


def _checkSMS(sms: "SMSConfig") -> Optional[tuple[str, str]]:
    if sms.domain is None:
        return None
    if sms.smsc is None:
        return ("smsc", "required with domain (e.g. tcp:host=smsc.example.com:port=2775)")
    if not sms.system_id:
        return ("system_id", "required with domain")
    return None


def _readOnly(mapping: Mapping) -> Mapping:
    return types.MappingProxyType(dict(mapping))


@attrs.frozen(kw_only=True)
class Config:
    """
    The whole configuration.

    @ivar domains: the C{[domain:NAME]} sections, read-only, by domain name
        (lower-case, without a trailing dot), in file order.
    @ivar providers: the C{[provider:NAME]} sections, read-only, by name
        (lower-case), in file order.
    @ivar dkim: the C{[dkim:DOMAIN]} sections, read-only, by domain
        (lower-case, without a trailing dot), in file order.
    """

    relay: RelayConfig = attrs.field(factory=RelayConfig)
    smtp: SMTPConfig = attrs.field(factory=SMTPConfig)
    delivery: DeliveryConfig = attrs.field(factory=DeliveryConfig)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    feedback: FeedbackConfig = attrs.field(factory=FeedbackConfig)
    tracking: TrackingConfig = attrs.field(factory=TrackingConfig)
    web: WebConfig = attrs.field(factory=WebConfig)
    export: ExportConfig = attrs.field(factory=ExportConfig)
    webhooks: WebhooksConfig = attrs.field(factory=WebhooksConfig)
    sms: SMSConfig = attrs.field(factory=SMSConfig)
    domains: Mapping[str, DomainConfig] = attrs.field(
        factory=dict, converter=_readOnly, hash=False
    )
    providers: Mapping[str, ProviderConfig] = attrs.field(
        factory=dict, converter=_readOnly, hash=False
    )
    dkim: Mapping[str, DKIMConfig] = attrs.field(
        factory=dict, converter=_readOnly, hash=False
    )

    def providerFor(self, host: str) -> Optional[ProviderConfig]:
        """
        The provider whose L{ProviderConfig.mx_suffixes} match the MX host
        name C{host}, or L{None}.  If several match, the longest matching
        suffix wins, then the first section in the file.
        """
        best, bestLength = None, 0
        for provider in self.providers.values():
            length = provider.matchLength(host)
            if length > bestLength:
                best, bestLength = provider, length
        return best


#: INI section name -> (Config field, section class).
SECTIONS: dict[str, tuple[str, type]] = {
    "smartrelay": ("relay", RelayConfig),
    "smtp": ("smtp", SMTPConfig),
    "delivery": ("delivery", DeliveryConfig),
    "store": ("store", StoreConfig),
    "feedback": ("feedback", FeedbackConfig),
    "tracking": ("tracking", TrackingConfig),
    "web": ("web", WebConfig),
    "export": ("export", ExportConfig),
    "webhooks": ("webhooks", WebhooksConfig),
    "sms": ("sms", SMSConfig),
}

#: Named sections: prefix -> (Config field, section class).  A section
#: C{[PREFIX:NAME]} makes one section object, whose C{name} field (declared
#: with L{_sectionName}) is NAME parsed; the Config field maps names to them.
NAMED_SECTIONS: dict[str, tuple[str, type]] = {
    "domain": ("domains", DomainConfig),
    "provider": ("providers", ProviderConfig),
    "dkim": ("dkim", DKIMConfig),
}

#: Cross-key checks run after a section's keys parse: each takes the
#: section object and returns (key, problem) or None.  Named sections are
#: listed under their prefix.
_SECTION_CHECKS: dict[str, list[Callable[[Any], Optional[tuple[str, str]]]]] = {
    "smtp": [_checkTLS],
    "dkim": [_checkDKIM],
    "webhooks": [_checkWebhooks],
    "sms": [_checkSMS],
}


def sectionKeys(sectionClass: type) -> list[str]:
    """
    The INI keys a section class accepts, in declaration order.
    """
    return [f.name for f in attrs.fields(sectionClass) if _PARSE in f.metadata]


# ---------------------------------------------------------------------------
# Parsing


def _readINI(text: str, source: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=True,
        interpolation=None,
        empty_lines_in_values=False,
        # "[DEFAULT]" is then an ordinary (unknown) section, not a source of
        # keys for every other section.
        default_section="\0no default section",
    )
    try:
        parser.read_string(text, source=source)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(
            f"duplicate section (line {e.lineno})", source, e.section
        ) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"duplicate key (line {e.lineno})", source, e.section, e.option) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(
            f"line {e.lineno}: {e.line.strip()!r} is outside any section "
            "(start the file with a [section] header)",
            source,
        ) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        try:
            # configparser keeps repr(line); show the line itself, stripped.
            line = repr(ast.literal_eval(line).strip())
        except (ValueError, SyntaxError, AttributeError):
            pass
        others = len(e.errors) - 1
        more = ""
        if others:
            more = f" (and {others} more bad line{'s' if others > 1 else ''})"
        raise ConfigError(
            f"line {lineno}: cannot parse {line}; expected 'key = value'{more}", source
        ) from None
    except configparser.Error as e:
        raise ConfigError(_oneLine(e), source) from None
    return parser


def parseConfig(text: str, source: str = "<config>") -> Config:
    """
    Parse and validate the text of an INI file.

    Keys that are not set take their defaults.  Files the configuration
    names (C{auth_file}, C{tls_certificate}, C{tls_key},
    C{tls_ca_certificates}, the DKIM keys) are read to check them; relative paths are
    relative to the current directory.

    @param source: the file name for messages.
    @raise ConfigError: for anything wrong, with a one-line message.
    """
    parser = _readINI(text, source)
    sections: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {field: {} for field, _ in NAMED_SECTIONS.values()}
    headers: dict[tuple[str, str], str] = {}
    for section in parser.sections():
        prefix, colon, suffix = section.partition(":")
        if colon and prefix in NAMED_SECTIONS:
            fieldName, sectionClass = NAMED_SECTIONS[prefix]
            if not suffix.strip():
                raise ConfigError(
                    f"a name is needed after '{prefix}:', as in [{prefix}:NAME]",
                    source, section,
                )
            nameField = attrs.fields_dict(sectionClass)["name"]
            try:
                name = nameField.metadata[_NAME](suffix)
            except ValueError as e:
                raise ConfigError(str(e), source, section) from None
            if (prefix, name) in headers:
                raise ConfigError(
                    f"duplicate section (the same as [{headers[prefix, name]}])",
                    source, section,
                )
            headers[prefix, name] = section
            sectionObject = _parseSection(
                parser, source, section, prefix, sectionClass, {"name": name}
            )
            named[fieldName][name] = sectionObject
        elif section in SECTIONS:
            fieldName, sectionClass = SECTIONS[section]
            sections[fieldName] = _parseSection(
                parser, source, section, section, sectionClass, {}
            )
        elif section in NAMED_SECTIONS:
            raise ConfigError(
                f"a name is needed, as in [{section}:NAME]", source, section
            )
        else:
            candidates = list(SECTIONS)
            if colon:
                candidates += [f"{other}:{suffix}" for other in NAMED_SECTIONS]
            raise ConfigError(
                f"unknown section{_suggest(section, candidates)}", source, section
            )
    config = Config(**sections, **named)
    _checkSMSDomain(config, source)
    return config


def _checkSMSDomain(config: "Config", source: str) -> None:
    """
    The SMS domain must be no other section's domain: mail to it never
    reaches an MX, so a C{[domain:...]} section for it would silently not
    apply, and the bounce domain is the feedback listener's.

    @raise ConfigError: naming C{[sms] domain}.
    """
    domain = config.sms.domain
    if domain is None:
        return
    if domain in config.domains:
        raise ConfigError(
            f"{domain} also has a [domain:{domain}] section, whose keys never apply to SMS",
            source, "sms", "domain",
        )
    if domain == config.feedback.bounce_domain:
        raise ConfigError(
            "must not be [feedback] bounce_domain (mail there is the feedback listener's)",
            source, "sms", "domain",
        )


def _parseSection(
    parser: configparser.ConfigParser,
    source: str,
    section: str,
    kind: str,
    sectionClass: type,
    values: dict[str, Any],
) -> Any:
    """
    Parse the keys of one INI section into an instance of C{sectionClass}.

    @param kind: the section name, or the prefix of a named section; it
        selects the L{_SECTION_CHECKS}.
    @param values: fields that do not come from keys (a named section's
        C{name}); the keys' values are added to it.
    @raise ConfigError: for an unknown key, a bad value, a missing
        required key or a failed check.
    """
    known = {f.name: f for f in attrs.fields(sectionClass) if _PARSE in f.metadata}
    for key, raw in parser.items(section):
        if key not in known:
            raise ConfigError(
                f"unknown key {key!r}{_suggest(key, known)}", source, section, key
            )
        try:
            values[key] = known[key].metadata[_PARSE](raw)
        except ValueError as e:
            raise ConfigError(str(e), source, section, key) from None
    for key, field in known.items():
        if key not in values and field.default is attrs.NOTHING:
            raise ConfigError("required key missing", source, section, key)
    sectionObject = sectionClass(**values)
    for check in _SECTION_CHECKS.get(kind, []):
        problem = check(sectionObject)
        if problem is not None:
            raise ConfigError(problem[1], source, section, problem[0])
    return sectionObject


def loadConfig(path: str) -> Config:
    """
    Read and parse the INI file at C{path} (relative to the current
    directory unless absolute).

    @raise ConfigError: if it cannot be read or is not valid.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"line {line}: not valid UTF-8", path) from None
    return parseConfig(text, path)


def defaultConfig() -> Config:
    """
    The configuration with every key at its default.
    """
    return parseConfig("")
