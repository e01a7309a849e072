"""
A small synchronous client of the relay's JSON API (C{/api/v1/}, see
C{docs/api.md}) for the command line: C{urllib} with a timeout, and every
failure turned into one line (L{CommandError}, or L{UsageError} for a bad
parameter the API named).

Where the API is and which token to send: L{ApiSettings.resolve} takes
them from the flags, else the environment (C{SMARTRELAY_URL},
C{SMARTRELAY_TOKEN}), else the configuration (C{[web] listen}, the first
of C{[web] api_tokens}).
"""

import configparser
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional

import attrs

from smartrelay.commands.base import CommandError, UsageError
from smartrelay.config import ConfigError, parseConfig

__all__ = ["ApiClient", "ApiSettings", "Response", "listenURL"]


def _usage(text: str) -> UsageError:
    return UsageError(f"smartrelay: {text}")

#: The API's address with the built-in C{[web] listen}.
DEFAULT_URL = "http://127.0.0.1:8080"

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _endpointParts(description: str) -> tuple[str, list, dict]:
    """
    The type, positional and named arguments of an endpoint string
    (backslash escapes a colon).
    """
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, rest = parts[0].lower(), parts[1:]
    positional = [p for p in rest if "=" not in p]
    named = dict(p.split("=", 1) for p in rest if "=" in p)
    return kind, positional, named


def listenURL(listen: str) -> str:
    """
    The URL that reaches a web server listening on the server endpoint
    string C{listen} from this host: C{tcp:8080:interface=127.0.0.1} is
    C{http://127.0.0.1:8080}, a wildcard interface is reached on loopback,
    C{ssl:} is https.

    @raise UsageError: a UNIX socket or another endpoint no URL reaches.
    """
    kind, positional, named = _endpointParts(listen)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise _usage(
            f"[web] listen = {listen} cannot be reached by URL: give --url or SMARTRELAY_URL"
        )
    port = named.get("port") or (positional[0] if positional else "")
    interface = named.get("interface", "::" if kind == "tcp6" else "")
    host = _WILDCARDS.get(interface, interface)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}"


def _webSection(path: str):
    """
    The C{[web]} section of the configuration file C{path}, validated as
    the relay would (the other sections are not read: the key files they
    name may be unreadable to the operator).

    @raise UsageError: the file cannot be read or the section is bad.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _usage(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    parser = configparser.ConfigParser(
        strict=True, interpolation=None, default_section="\0no default section"
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        # The relay's own reader says it better.
        try:
            parseConfig(text, path)
        except ConfigError as problem:
            raise _usage(str(problem)) from None
        raise _usage(f"{path}: {' '.join(str(e).split())}") from None
    lines = ["[web]\n"]
    if parser.has_section("web"):
        for key, value in parser.items("web"):
            lines.append(f"{key} = " + value.replace("\n", "\n    ") + "\n")
    try:
        return parseConfig("".join(lines), path).web
    except ConfigError as e:
        raise _usage(str(e)) from None


@attrs.frozen
class ApiSettings:
    """
    Where the API is and how to authorise.

    @ivar url: the base URL (scheme, host, port, an optional path prefix),
        without a trailing slash.
    @ivar token: the bearer token.
    @ivar timeout: seconds to wait for the connection and for each answer.
    """

    url: str
    token: str
    timeout: float = 30.0

    @classmethod
    def resolve(
        cls,
        url: Optional[str],
        token: Optional[str],
        configPath: Optional[str],
        environ: Mapping[str, str] = os.environ,
        timeout: float = 30.0,
    ) -> "ApiSettings":
        """
        The settings from the flags (C{url}, C{token}), else the
        environment, else the configuration file, else the defaults
        (C{http://127.0.0.1:8080}, no token: an error).

        @raise UsageError: no token, a bad URL, or a bad configuration.
        """
        web = _webSection(configPath) if configPath is not None else None
        url = url or environ.get("SMARTRELAY_URL") or None
        if url is None:
            url = listenURL(web.listen) if web is not None else DEFAULT_URL
        token = token or environ.get("SMARTRELAY_TOKEN") or None
        if token is None and web is not None and web.api_tokens:
            token = web.api_tokens[0]
        if token is None:
            raise _usage(
                "no API token: give --token, set SMARTRELAY_TOKEN, or --config FILE "
                "with [web] api_tokens"
            )
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _usage(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        if not timeout > 0:
            raise _usage("--timeout must be more than 0 seconds")
        return cls(url=url.rstrip("/"), token=token, timeout=timeout)


@attrs.frozen
class Response:
    """
    A successful answer.

    @ivar status: the HTTP status (2xx).
    @ivar contentType: the media type, lower-case, without parameters.
    @ivar body: the bytes.
    """

    status: int
    contentType: str
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CommandError(f"the API answered {self.status} with something that is not JSON") from None


def _errorLine(status: int, reason: str, body: bytes, url: str) -> tuple[Optional[str], str]:
    """
    The API error's code and a one-line message for an error answer.
    """
    try:
        error = json.loads(body.decode("utf-8"))["error"]
        code, message = str(error["code"]), str(error["message"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, f"{url} answered {status} {reason} (not a smartrelay API answer: is --url right?)"
    return code, " ".join(f"{message} ({status} {code})".split())


@attrs.define
class ApiClient:
    """
    Requests to the API, one at a time.

    @ivar settings: the L{ApiSettings}.
    @ivar opener: a L{urllib.request.OpenerDirector}.
    """

    settings: ApiSettings
    opener: Any = attrs.field(factory=urllib.request.build_opener)

    def request(
        self,
        method: str,
        path: str,
        query: Optional[Mapping[str, Any]] = None,
        body: Optional[bytes] = None,
        contentType: Optional[str] = None,
    ) -> Response:
        """
        One request to C{BASE/api/v1/PATH}; L{None} values in C{query} are
        left out.

        @raise CommandError: no connection, no answer, or an error answer
            (its message); L{UsageError} for a bad parameter.
        """
        url = f"{self.settings.url}/api/v1/{path.lstrip('/')}"
        pairs = [(k, str(v)) for k, v in (query or {}).items() if v is not None]
        if pairs:
            url += "?" + urllib.parse.urlencode(pairs)
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.settings.token}")
        request.add_header("Accept", "application/json")
        if contentType is not None:
            request.add_header("Content-Type", contentType)
        base = self.settings.url
        try:
            with self.opener.open(request, timeout=self.settings.timeout) as answer:
                data = answer.read()
                status = answer.status
                kind = answer.headers.get_content_type()
        except urllib.error.HTTPError as e:
            data = e.read() if e.fp is not None else b""
            code, message = _errorLine(e.code, e.reason, data, base)
            if e.code == 401:
                raise CommandError(
                    f"{message}: the API refused the token (check --token, "
                    "SMARTRELAY_TOKEN or [web] api_tokens)"
                ) from None
            if e.code == 400 and code == "bad_parameter":
                raise _usage(f"{message}") from None
            raise CommandError(message) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ConnectionRefusedError):
                raise CommandError(
                    f"cannot connect to {base}: connection refused (is smartrelay running, "
                    "and is this its [web] listen address?)"
                ) from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise CommandError(
                    f"no answer from {base} within {self.settings.timeout:g} s") from None
            if isinstance(reason, ssl.SSLError):
                raise CommandError(f"TLS with {base} failed: {reason}") from None
            if isinstance(reason, socket.gaierror):
                raise CommandError(f"cannot connect to {base}: unknown host") from None
            raise CommandError(f"cannot connect to {base}: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise CommandError(f"no answer from {base} within {self.settings.timeout:g} s") from None
        except (ConnectionError, OSError) as e:
            raise CommandError(f"the connection to {base} failed: {e}") from None
        return Response(status=status, contentType=kind, body=data)

    def json(self, method: str, path: str, query: Optional[Mapping[str, Any]] = None,
             document: Any = None) -> Any:
        """
        A request with an optional JSON body, its answer decoded.
        """
        body = None if document is None else json.dumps(document).encode("utf-8")
        response = self.request(method, path, query, body,
                                "application/json" if body is not None else None)
        return response.json()

    def pages(self, path: str, query: Mapping[str, Any], limit: Optional[int] = None):
        """
        Every item of a list, page by page along C{next_cursor}; at most
        C{limit} when given.
        """
        query = dict(query)
        count = 0
        while True:
            if limit is not None:
                query["limit"] = min(1000, limit - count)
            else:
                query.setdefault("limit", 1000)
            page = self.json("GET", path, query)
            for item in page.get("items", []):
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query["cursor"] = cursor
