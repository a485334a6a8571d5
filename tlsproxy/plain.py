"""The plain-HTTP (port 80) service: ACME http-01 challenges, and redirects to HTTPS.

A request for ``/.well-known/acme-challenge/<token>`` (GET or HEAD) is answered
from the tokens tlsproxy's own ACME client published in memory
(`ChallengeTokens`), else from the host's webroot directory or the global
``acme.webroot``, where external clients (``certbot --webroot -w DIR``) write
``DIR/.well-known/acme-challenge/<token>``.  Every other request for a
configured host is redirected to the same path and query on HTTPS (301 for
GET/HEAD, 308 otherwise, configurable per host).  The proxy engine on the
plain port sends requests here (see `tlsproxy.routing.PlainRouter`), except
those of hosts with ``insecure_plain_http: true``, which it proxies itself.

What this module must not do:

* send HSTS or HPKP headers (they mean nothing, or harm, over plain HTTP);
* redirect to a host that is not configured, whatever the ``Host`` header or
  an absolute request target says (unknown host: 404, malformed: 400);
* serve anything from a webroot but a regular file whose name is a base64url
  token: no other characters, no ``..``, no directory listings, no symlinks
  (not even inside the webroot), nothing larger than 64 KiB;
* buffer request bodies: they are not needed on this port, so bodies over
  64 KiB are refused with 413 before they are read.

twisted.web is used here because this port is not a hot path.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from tlsproxy.config import Config, HostConfig
from tlsproxy.errors import Problem
from tlsproxy.hostnames import HostTable, InvalidHostname, normalize

log = Logger()

#: twisted.web's request objects are untyped; this names them at our boundary.
WebRequest = Any

ACME_CHALLENGE_PATH = b"/.well-known/acme-challenge/"
#: Tokens are base64url without padding (RFC 8555 §8.3); the limit keeps them
#: valid file names.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,255}")
#: A challenge file is a key authorization (about 90 bytes); anything much
#: larger is not one.
MAX_CHALLENGE_FILE = 64 * 1024
#: Request bodies accepted on the plain port (none are needed).
MAX_REQUEST_BODY = 64 * 1024
#: How long a connection may stay idle on the plain port.
IDLE_TIMEOUT = 30

_ABSOLUTE_TARGET = re.compile(rb"^[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)([^#]*)$")
_PORT = re.compile(rb"^[0-9]{0,5}$")
_SAFE_TARGET_BYTES = frozenset(range(0x21, 0x7F))


def valid_token(token: str) -> bool:
    """Whether ``token`` can be an ACME http-01 token: 1-255 base64url characters."""
    return _TOKEN.fullmatch(token) is not None


@attrs.define
class ChallengeTokens:
    """The http-01 tokens tlsproxy's own ACME client is answering right now.

    Call `publish` before telling the ACME server the challenge is ready and
    `remove` once it is validated or abandoned.  Use from the reactor thread
    (an ACME client running in a thread uses ``reactor.callFromThread``).
    """

    _tokens: dict[str, bytes] = attrs.field(factory=dict, init=False)

    def publish(self, token: str, key_authorization: str) -> None:
        """Answer ``GET /.well-known/acme-challenge/<token>`` with ``key_authorization``.

        :raises ValueError: if the token is not base64url or the key
            authorization is not printable ASCII.
        """
        if not valid_token(token):
            raise ValueError("an ACME token must be 1-255 base64url characters")
        if not key_authorization or not re.fullmatch(r"[\x21-\x7e]+", key_authorization):
            raise ValueError("a key authorization must be printable ASCII without spaces")
        self._tokens[token] = key_authorization.encode("ascii")

    def remove(self, token: str) -> None:
        """Stop answering for ``token`` (no error if it was not published)."""
        self._tokens.pop(token, None)

    def get(self, token: str) -> bytes | None:
        """The key authorization published for ``token``, or None."""
        return self._tokens.get(token)

    def __len__(self) -> int:
        return len(self._tokens)


def _open_dir(name: str | bytes, dir_fd: int | None, follow: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= os.O_NOFOLLOW
    return os.open(name, flags, dir_fd=dir_fd)


def read_webroot_token(webroot: str, token: str) -> bytes | None:
    """The contents of ``webroot/.well-known/acme-challenge/<token>``, or None.

    The configured ``webroot`` itself may be a symlink; below it, symlinks are
    never followed (each step is opened with ``O_NOFOLLOW`` relative to the
    previous one), and only a regular file of at most `MAX_CHALLENGE_FILE`
    bytes is returned.  ``token`` must pass `valid_token`.

    :raises OSError: for failures other than "not there" (permissions, I/O),
        which the caller logs.
    """
    if not valid_token(token):
        return None
    fds: list[int] = []
    try:
        try:
            fds.append(_open_dir(webroot, None, follow=True))
            fds.append(_open_dir(".well-known", fds[-1], follow=False))
            fds.append(_open_dir("acme-challenge", fds[-1], follow=False))
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fds.append(os.open(token, flags, dir_fd=fds[-1]))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR):
                return None  # missing, a symlink (ELOOP/ENOTDIR), or a directory
            raise
        info = os.fstat(fds[-1])
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CHALLENGE_FILE:
            return None
        with os.fdopen(os.dup(fds[-1]), "rb") as f:
            data = f.read(MAX_CHALLENGE_FILE + 1)
        return data if len(data) <= MAX_CHALLENGE_FILE else None
    finally:
        for fd in fds:
            os.close(fd)


def https_port_from_endpoints(descriptions: Sequence[str]) -> int | None:
    """The TCP port of the first HTTPS endpoint string, if it names one.

    ``tcp:443``, ``tcp:port=8443:interface=::1``, ``tcp6:443``, ``ssl:443``
    give their port; ``systemd:…``, ``unix:…`` and port 0 give None (the
    caller then assumes 443, or a host sets ``redirect.https_port``).
    """
    if not descriptions:
        return None
    parts = re.split(r"(?<!\\):", descriptions[0])
    kind, args = parts[0].lower(), parts[1:]
    if kind not in ("tcp", "tcp6", "ssl", "tls"):
        return None
    port: str | None = None
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key == "port":
            port = value
            break
        if not eq and port is None:
            port = arg  # the first positional argument is the port
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return int(port)


def redirect_location(host: str, https_port: int, target: bytes) -> bytes:
    """``https://host[:port]<target>``, the port omitted when it is 443.

    ``target`` is the origin-form path and query as received; bytes outside
    printable ASCII are percent-encoded, so the result is always a valid
    header value.
    """
    authority = host if https_port == 443 else f"{host}:{https_port}"
    path = b"".join(bytes((b,)) if b in _SAFE_TARGET_BYTES else b"%%%02X" % b for b in target)
    return b"https://" + authority.encode("ascii") + path


class _BadRequest(Exception):
    """The request cannot be answered; ``status`` and ``message`` say how."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _split_authority(authority: bytes) -> bytes:
    """The host part of ``host[:port]``; raises `_BadRequest` for a bad port."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end == -1 or not (authority[end + 1 :] == b"" or authority[end + 1 : end + 2] == b":"):
            raise _BadRequest(400, "malformed Host")
        name, port = authority[: end + 1], authority[end + 2 :]
    else:
        name, _, port = authority.partition(b":")
    if not _PORT.match(port) or not name:
        raise _BadRequest(400, "malformed Host")
    return name


@attrs.frozen
class _Target:
    """A request's host name (normalised, or None for an IP literal) and
    origin-form path and query."""

    host: str | None
    path: bytes


def _parse_target(request: WebRequest) -> tuple[bytes, bytes | None]:
    """(origin-form path?query, authority from an absolute target or None)."""
    uri: bytes = request.uri
    if uri.startswith(b"/"):
        if b"#" in uri:
            raise _BadRequest(400, "a request target must not contain '#'")
        return uri, None
    match = _ABSOLUTE_TARGET.match(uri)
    if match is None:
        raise _BadRequest(400, "unsupported request target")
    authority, rest = match.group(1), match.group(2)
    if b"@" in authority:
        raise _BadRequest(400, "a request target must not contain credentials")
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest, authority


def _request_host(request: WebRequest, authority: bytes | None) -> str | None:
    """The normalised host the request is for; None for an IP literal.

    An absolute request target's authority wins over ``Host`` (RFC 9112 §3.2.2),
    but ``Host`` must still be present exactly once.
    """
    values = request.requestHeaders.getRawHeaders(b"host") or []
    if len(values) != 1:
        raise _BadRequest(400, "exactly one Host header is required")
    name = _split_authority(authority if authority is not None else values[0].strip())
    if name.startswith(b"["):
        return None  # an IPv6 literal: valid, but never a configured host
    try:
        return normalize(name)
    except InvalidHostname:
        raise _BadRequest(400, "malformed Host") from None


class PlainResource(Resource):
    """The whole plain-HTTP site: one leaf resource that answers every request."""

    isLeaf = True

    def __init__(
        self,
        config: Config,
        tokens: ChallengeTokens,
        https_port: int | None,
    ) -> None:
        Resource.__init__(self)
        self._hosts: HostTable[HostConfig] = HostTable()
        for host in config.hosts:
            for pattern in host.names:
                self._hosts.add(pattern, host)
        self._tokens = tokens
        self._webroot = config.acme.webroot
        self._https_port = https_port or 443

    def render(self, request: WebRequest) -> bytes | int:
        request.responseHeaders.removeHeader(b"server")
        try:
            path, authority = _parse_target(request)
            method: bytes = request.method
            if method in (b"GET", b"HEAD") and path.startswith(ACME_CHALLENGE_PATH):
                return self._challenge(request, path, authority)
            host_name = _request_host(request, authority)
            host = self._hosts.lookup(host_name) if host_name else None
            if host is None or host_name is None:
                raise _BadRequest(404, "no site is configured for this host")
        except _BadRequest as exc:
            return _text(request, exc.status, exc.message)
        status = host.redirect.status if method in (b"GET", b"HEAD") else host.redirect.other_status
        location = redirect_location(host_name, host.redirect.https_port or self._https_port, path)
        request.setResponseCode(status)
        request.setHeader(b"location", location)
        return _text(request, status, "moved to " + location.decode("ascii"))

    def _challenge(self, request: WebRequest, path: bytes, authority: bytes | None) -> bytes:
        raw = path[len(ACME_CHALLENGE_PATH) :].split(b"?", 1)[0]
        token = raw.decode("latin-1")
        if not valid_token(token):
            log.info("refused a malformed ACME token {token!r}", token=token[:80])
            return _text(request, 404, "no such ACME challenge")
        body = self._tokens.get(token)
        source = "memory"
        if body is None:
            webroot = self._webroot
            try:
                host_name = _request_host(request, authority)
            except _BadRequest:
                host_name = None
            host = self._hosts.lookup(host_name) if host_name else None
            if host is not None and host.webroot:
                webroot = host.webroot
            if webroot:
                source = webroot
                try:
                    body = read_webroot_token(webroot, token)
                except OSError as exc:
                    log.error(
                        "cannot read ACME token {token} under {webroot}: {reason}",
                        token=token,
                        webroot=webroot,
                        reason=exc.strerror or str(exc),
                    )
        if body is None:
            return _text(request, 404, "no such ACME challenge")
        log.info("answered ACME challenge {token} from {source}", token=token, source=source)
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body


def _text(request: WebRequest, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode("utf-8")


class PlainRequest(Request):
    """A twisted.web request that refuses bodies over `MAX_REQUEST_BODY` with 413,
    before reading them (twisted.web would otherwise spool any size to disk)."""

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_REQUEST_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        transport: Any = self.channel.transport if self.channel else None
        if transport is not None:
            transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            transport.loseConnection()


class PlainSite(Site):
    """`Site` with `PlainRequest`, a short idle timeout and no start/stop chatter."""

    noisy = False
    requestFactory = PlainRequest

    def __init__(self, resource: IResource, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, **kwargs)
        self.displayTracebacks = False


def plain_resource(
    config: Config, tokens: ChallengeTokens, https_port: int | None = None
) -> PlainResource:
    """The resource answering every plain-HTTP request (see `make_plain_site`)."""
    if https_port is None:
        https_port = https_port_from_endpoints(config.listen.https)
    return PlainResource(config, tokens, https_port)


def make_plain_site(
    config: Config,
    tokens: ChallengeTokens,
    https_port: int | None = None,
    *,
    reactor: Any = None,
) -> Site:
    """The port-80 service as a twisted.web site (the proxy engine in front of it
    forwards plain-HTTP requests to it over loopback).

    :param https_port: the HTTPS port put in redirects (omitted when 443);
        default: `https_port_from_endpoints` of ``config.listen.https``, else
        443.  A host's ``redirect.https_port`` overrides it.
    """
    resource = plain_resource(config, tokens, https_port)
    if reactor is None:
        return PlainSite(resource)
    return PlainSite(resource, reactor=reactor)


def plain_problems(config: Config) -> list[Problem]:
    """Start-up warnings about the plain-HTTP service's configuration.

    Hosts proxied over plain HTTP (``insecure_plain_http``), webroots that are not
    directories, and redirects whose HTTPS port had to be guessed.
    """
    problems: list[Problem] = []
    if not config.listen.http:
        return problems
    webroots = [("acme.webroot", config.acme.webroot)]
    webroots += [(f"hosts.{h.name}.webroot", h.webroot) for h in config.hosts]
    for path, webroot in webroots:
        if webroot and not os.path.isdir(webroot):
            problems.append(
                Problem(
                    path,
                    f"{webroot} is not a directory (yet); ACME challenges put there "
                    "cannot be answered until it is",
                    warning=True,
                )
            )
    guessed = https_port_from_endpoints(config.listen.https) is None
    for host in config.hosts:
        if not host.redirect.enabled:
            problems.append(
                Problem(
                    f"hosts.{host.name}.insecure_plain_http",
                    "INSECURE: plain-HTTP requests for this host are proxied unencrypted "
                    "instead of being redirected to HTTPS",
                    warning=True,
                )
            )
        elif guessed and config.listen.https and host.redirect.https_port is None:
            problems.append(
                Problem(
                    f"hosts.{host.name}.redirect",
                    f"cannot tell the HTTPS port from {config.listen.https[0]!r}; redirects "
                    "assume 443 (set redirect.https_port if clients use another port)",
                    warning=True,
                )
            )
    return problems
