"""Tests for `tlsproxy.plain`: the port-80 service, driven in memory.

Requests are written byte by byte into the real twisted.web channel of the
plain site over a `StringTransport`, so what is checked is what a client on
port 80 would receive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tlsproxy.config import Backend, Config, parse_config
from tlsproxy.errors import ConfigError
from tlsproxy.plain import (
    MAX_CHALLENGE_FILE,
    MAX_REQUEST_BODY,
    ChallengeTokens,
    https_port_from_endpoints,
    make_plain_site,
    plain_problems,
    read_webroot_token,
    redirect_location,
    valid_token,
)
from tlsproxy.routing import PlainRouter

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEY_AUTHORIZATION = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


@attrs.frozen
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_response(raw: bytes, head: bool = False) -> Response:
    head_part, _, body = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "content-length" in headers and not head:
        body = body[: int(headers["content-length"][0])]
    return Response(status=status, headers=headers, body=body, raw=raw)


def document(**host_extra: Any) -> dict[str, Any]:
    return {
        "listen": {
            "https": ["tcp:8443:interface=127.0.0.1"],
            "http": ["tcp:8080:interface=127.0.0.1"],
        },
        "hosts": {
            "example.com": {
                "aliases": ["www.example.com", "*.apps.example.com"],
                "certificates": ["/nonexistent/example.pem"],
                "backend": "http://127.0.0.1:8000",
                **host_extra,
            },
            "other.example": {
                "certificates": ["/nonexistent/other.pem"],
                "backend": "http://127.0.0.1:8001",
            },
        },
    }


def config(doc: dict[str, Any] | None = None, **host_extra: Any) -> Config:
    return parse_config(doc or document(**host_extra), "proxy.yaml")


class Client:
    """One port-80 connection to a plain site."""

    def __init__(self, site: Any) -> None:
        self.transport = StringTransport()
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, raw: bytes, head: bool = False) -> Response:
        self.protocol.dataReceived(raw)
        out = self.transport.value()
        self.transport.clear()
        return parse_response(out, head=head)


def request(
    site: Any,
    target: str | bytes,
    host: str | None = "example.com",
    method: str = "GET",
    extra: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> Response:
    if isinstance(target, str):
        target = target.encode("ascii")
    raw = method.encode() + b" " + target + b" " + version + b"\r\n"
    if host is not None:
        raw += b"Host: " + host.encode("latin-1") + b"\r\n"
    raw += extra + b"\r\n"
    return Client(site).send(raw, head=method == "HEAD")


@pytest.fixture
def tokens() -> ChallengeTokens:
    return ChallengeTokens()


@pytest.fixture
def site(tokens: ChallengeTokens) -> Any:
    return make_plain_site(config(), tokens)


def write_token(webroot: Path, token: str, body: bytes) -> Path:
    directory = webroot / ".well-known" / "acme-challenge"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / token
    path.write_bytes(body)
    return path


# -- the in-memory token store ------------------------------------------------------------


def test_published_token_is_answered_with_its_key_authorization(
    site: Any, tokens: ChallengeTokens
) -> None:
    """A token published by tlsproxy's ACME client is served as text/plain, exactly."""
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    response = request(site, f"/.well-known/acme-challenge/{TOKEN}")
    assert response.status == 200
    assert response.body == KEY_AUTHORIZATION.encode()
    assert response.header("content-type") == "text/plain"


def test_head_on_a_token_gives_headers_without_body(site: Any, tokens: ChallengeTokens) -> None:
    """HEAD on a challenge answers 200 with the length but no body."""
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    response = request(site, f"/.well-known/acme-challenge/{TOKEN}", method="HEAD")
    assert response.status == 200
    assert response.header("content-length") == str(len(KEY_AUTHORIZATION))
    assert response.body == b""


def test_removed_token_is_no_longer_answered(site: Any, tokens: ChallengeTokens) -> None:
    """After remove(), the challenge URL gives 404."""
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    tokens.remove(TOKEN)
    tokens.remove(TOKEN)  # removing twice is fine
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}").status == 404
    assert len(tokens) == 0


def test_missing_token_is_404(site: Any) -> None:
    """A token nobody published is 404, not a redirect."""
    response = request(site, f"/.well-known/acme-challenge/{TOKEN}")
    assert response.status == 404
    assert response.header("location") is None


def test_challenges_are_answered_whatever_the_host(site: Any, tokens: ChallengeTokens) -> None:
    """Challenges are answered for names not (yet) configured, e.g. while bootstrapping."""
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    for host in ("new.example.net", "EXAMPLE.com:8080", "[::1]:80"):
        response = request(site, f"/.well-known/acme-challenge/{TOKEN}", host=host)
        assert (response.status, response.body) == (200, KEY_AUTHORIZATION.encode())


@pytest.mark.parametrize(
    "token",
    ["", "a/b", "a.b", "..", "a b", "a%2Fb", "ä", "x" * 256, "a=", "a+b"],
)
def test_publish_refuses_malformed_tokens(tokens: ChallengeTokens, token: str) -> None:
    """Only base64url tokens of 1-255 characters can be published."""
    with pytest.raises(ValueError):
        tokens.publish(token, KEY_AUTHORIZATION)


def test_publish_refuses_a_key_authorization_with_line_breaks(tokens: ChallengeTokens) -> None:
    """A key authorization must be printable ASCII, so it cannot inject headers or HTML."""
    with pytest.raises(ValueError):
        tokens.publish(TOKEN, "abc\r\nX-Evil: 1")


# -- the webroot --------------------------------------------------------------------------


def webroot_site(tmp_path: Path, tokens: ChallengeTokens, **host_extra: Any) -> Any:
    doc = document(**host_extra)
    doc["acme"] = {"webroot": str(tmp_path / "webroot")}
    (tmp_path / "webroot").mkdir(exist_ok=True)
    return make_plain_site(config(doc), tokens)


def test_webroot_token_written_by_certbot_is_served(
    tmp_path: Path, tokens: ChallengeTokens
) -> None:
    """A file certbot --webroot wrote into WEBROOT/.well-known/acme-challenge/ is served."""
    site = webroot_site(tmp_path, tokens)
    write_token(tmp_path / "webroot", TOKEN, KEY_AUTHORIZATION.encode())
    response = request(site, f"/.well-known/acme-challenge/{TOKEN}")
    assert (response.status, response.body) == (200, KEY_AUTHORIZATION.encode())
    assert response.header("content-type") == "text/plain"


def test_memory_tokens_win_over_the_webroot(tmp_path: Path, tokens: ChallengeTokens) -> None:
    """A token published in memory is answered even if a stale webroot file has the name."""
    site = webroot_site(tmp_path, tokens)
    write_token(tmp_path / "webroot", TOKEN, b"stale")
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}").body == KEY_AUTHORIZATION.encode()


def test_per_host_webroot_replaces_the_global_one(tmp_path: Path, tokens: ChallengeTokens) -> None:
    """A host's own webroot answers for its names; other hosts use acme.webroot."""
    own = tmp_path / "own"
    own.mkdir()
    site = webroot_site(tmp_path, tokens, webroot=str(own))
    write_token(own, TOKEN, b"own")
    write_token(tmp_path / "webroot", TOKEN, b"global")
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}", "www.example.com").body == b"own"
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}", "other.example").body == b"global"


@pytest.mark.parametrize(
    "target",
    [
        b"/.well-known/acme-challenge/../../secret.txt",
        b"/.well-known/acme-challenge/..%2F..%2Fsecret.txt",
        b"/.well-known/acme-challenge/%2e%2e%2fsecret.txt",
        b"/.well-known/acme-challenge/..",
        b"/.well-known/acme-challenge/.",
        b"/.well-known/acme-challenge/",
        b"/.well-known/acme-challenge//etc/passwd",
        b"/.well-known/acme-challenge/sub/" + TOKEN.encode(),
        b"/.well-known/acme-challenge/" + TOKEN.encode() + b"%00",
        b"/.well-known/acme-challenge/" + TOKEN.encode() + b"/",
        b"/.well-known/acme-challenge/.hidden",
        b"/.well-known/acme-challenge/\\..\\secret.txt",
        b"/.well-known/acme-challenge/" + b"A" * 300,
    ],
)
def test_traversal_and_malformed_tokens_are_refused(
    tmp_path: Path, tokens: ChallengeTokens, target: bytes
) -> None:
    """Paths that are not one base64url token get 404 and never reach the file system."""
    site = webroot_site(tmp_path, tokens)
    (tmp_path / "secret.txt").write_bytes(b"SECRET")
    (tmp_path / "webroot" / "secret.txt").write_bytes(b"SECRET")
    write_token(tmp_path / "webroot", TOKEN, b"ok")
    (tmp_path / "webroot" / ".well-known" / "acme-challenge" / ".hidden").write_bytes(b"SECRET")
    response = request(site, target)
    assert response.status == 404
    assert b"SECRET" not in response.raw
    assert TOKEN.encode() + b"\n" not in response.body  # no listing


def test_symlinked_token_is_not_followed(tmp_path: Path, tokens: ChallengeTokens) -> None:
    """A token file that is a symlink (even to a file inside the webroot) is 404."""
    site = webroot_site(tmp_path, tokens)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET")
    challenge_dir = tmp_path / "webroot" / ".well-known" / "acme-challenge"
    challenge_dir.mkdir(parents=True)
    (challenge_dir / TOKEN).symlink_to(secret)
    (challenge_dir / "inside").write_bytes(b"SECRET")
    (challenge_dir / "linkinside").symlink_to(challenge_dir / "inside")
    for token in (TOKEN, "linkinside"):
        response = request(site, f"/.well-known/acme-challenge/{token}")
        assert response.status == 404
        assert b"SECRET" not in response.raw


def test_symlinked_challenge_directory_is_not_followed(
    tmp_path: Path, tokens: ChallengeTokens
) -> None:
    """A .well-known or acme-challenge directory that is a symlink out is not followed."""
    site = webroot_site(tmp_path, tokens)
    elsewhere = tmp_path / "elsewhere"
    write_token(elsewhere, TOKEN, b"SECRET")
    (tmp_path / "webroot" / ".well-known").symlink_to(elsewhere / ".well-known")
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}").status == 404
    (tmp_path / "webroot" / ".well-known").unlink()
    (tmp_path / "webroot" / ".well-known").mkdir()
    (tmp_path / "webroot" / ".well-known" / "acme-challenge").symlink_to(
        elsewhere / ".well-known" / "acme-challenge"
    )
    assert request(site, f"/.well-known/acme-challenge/{TOKEN}").status == 404


def test_configured_webroot_may_itself_be_a_symlink(tmp_path: Path) -> None:
    """The configured directory is the user's choice and may be a symlink."""
    real = tmp_path / "real"
    write_token(real, TOKEN, b"ok")
    (tmp_path / "link").symlink_to(real)
    assert read_webroot_token(str(tmp_path / "link"), TOKEN) == b"ok"


def test_directories_fifos_and_large_files_are_not_served(tmp_path: Path) -> None:
    """Only regular files up to 64 KiB count as challenge answers."""
    write_token(tmp_path, "big", b"x" * (MAX_CHALLENGE_FILE + 1))
    (tmp_path / ".well-known" / "acme-challenge" / "dir").mkdir()
    os.mkfifo(tmp_path / ".well-known" / "acme-challenge" / "fifo")
    write_token(tmp_path, "fits", b"x" * MAX_CHALLENGE_FILE)
    for token in ("big", "dir", "fifo", "absent"):
        assert read_webroot_token(str(tmp_path), token) is None
    assert read_webroot_token(str(tmp_path), "fits") == b"x" * MAX_CHALLENGE_FILE
    assert read_webroot_token(str(tmp_path / "missing"), "fits") is None


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_read_webroot_token_never_escapes(name: str) -> None:
    """Whatever the name, only a file directly in the challenge directory can be read."""
    import tempfile

    with tempfile.TemporaryDirectory() as top:
        root = Path(top) / "webroot"
        write_token(root, "only", b"ok")
        (Path(top) / "secret").write_bytes(b"SECRET")
        try:
            result = read_webroot_token(str(root), name)
        except (OSError, ValueError):
            result = None
        assert result in (None, b"ok")
        assert result is None or name == "only"


def test_valid_token_alphabet() -> None:
    """Tokens are base64url: letters, digits, '-' and '_' only."""
    assert valid_token(TOKEN)
    assert valid_token("a-b_C9")
    assert not valid_token("a.b")
    assert not valid_token("")


# -- redirects ----------------------------------------------------------------------------


def test_get_is_redirected_with_301_keeping_path_and_query(site: Any) -> None:
    """GET http://example.com:8080/a/b?x=1&y=%20 goes to https://example.com:8443/a/b?x=1&y=%20."""
    response = request(site, "/a/b?x=1&y=%20", host="example.com:8080")
    assert response.status == 301
    assert response.header("location") == "https://example.com:8443/a/b?x=1&y=%20"


def test_post_is_redirected_with_308(site: Any) -> None:
    """Other methods get 308 so that browsers repeat them with their body on HTTPS."""
    response = request(site, "/form", method="POST", extra=b"Content-Length: 0\r\n")
    assert response.status == 308
    assert response.header("location") == "https://example.com:8443/form"


def test_head_is_redirected_with_301(site: Any) -> None:
    """HEAD is redirected like GET."""
    response = request(site, "/", method="HEAD")
    assert response.status == 301
    assert response.body == b""


def test_port_443_is_left_out_of_the_location(tokens: ChallengeTokens) -> None:
    """When the HTTPS listener is on 443, Location has no port."""
    doc = document()
    doc["listen"]["https"] = ["tcp:443"]
    site = make_plain_site(config(doc), tokens)
    assert request(site, "/x").header("location") == "https://example.com/x"


def test_explicit_https_port_argument_wins(tokens: ChallengeTokens) -> None:
    """The caller may give the HTTPS port (e.g. after binding an ephemeral one)."""
    site = make_plain_site(config(), tokens, https_port=9443)
    assert request(site, "/x").header("location") == "https://example.com:9443/x"


def test_host_redirect_settings_choose_status_and_port(tokens: ChallengeTokens) -> None:
    """redirect: {status, other_status, https_port} are honoured per host."""
    site = make_plain_site(
        config(redirect={"status": 302, "other_status": 307, "https_port": 443}), tokens
    )
    get = request(site, "/p?q")
    assert (get.status, get.header("location")) == (302, "https://example.com/p?q")
    assert request(site, "/p", method="DELETE").status == 307
    assert request(site, "/p", host="other.example").status == 301


def test_aliases_and_wildcards_redirect_to_the_requested_name(site: Any) -> None:
    """www.example.com and a.apps.example.com keep their own name in the Location."""
    assert request(site, "/", "WWW.Example.COM.").header("location") == (
        "https://www.example.com:8443/"
    )
    assert request(site, "/", "a.apps.example.com").header("location") == (
        "https://a.apps.example.com:8443/"
    )


@pytest.mark.parametrize("host", ["evil.example", "b.a.apps.example.com", "127.0.0.1", "[::1]"])
def test_unknown_host_is_404_never_a_redirect(site: Any, host: str) -> None:
    """A Host that no site claims gets 404, so nobody can bounce users to their own host."""
    response = request(site, "/", host=host)
    assert response.status == 404
    assert response.header("location") is None


@pytest.mark.parametrize(
    "host",
    [
        "exa mple.com",
        "example.com:80:80",
        "example.com:http",
        "ex@mple.com",
        "example.com/evil",
        "[::1",
        "",
        "é.example",
    ],
)
def test_malformed_host_is_400(site: Any, host: str) -> None:
    """A Host that is not a host name gets 400 and no Location."""
    response = request(site, "/", host=host)
    assert response.status == 400
    assert response.header("location") is None


def test_missing_or_repeated_host_is_400(site: Any) -> None:
    """HTTP/1.0 without Host, and two Host headers, get 400."""
    assert request(site, "/", host=None, version=b"HTTP/1.0").status == 400
    response = request(site, "/", extra=b"Host: evil.example\r\n")
    assert response.status == 400
    assert response.header("location") is None


def test_absolute_target_names_the_host(site: Any) -> None:
    """An absolute-form request target's host wins over Host, and must be configured."""
    evil = request(site, "http://evil.example/x", host="example.com")
    assert (evil.status, evil.header("location")) == (404, None)
    good = request(site, "http://www.example.com:80/x?y", host="evil.example")
    assert good.header("location") == "https://www.example.com:8443/x?y"
    assert request(site, "http://user@example.com/", host="example.com").status == 400
    star = request(site, "*", method="OPTIONS")  # twisted.web answers this itself
    assert star.header("location") is None


def test_path_cannot_change_the_redirect_host(site: Any) -> None:
    """Paths like //evil.example or /\\evil.example stay paths on the configured host."""
    for target in (b"//evil.example/", b"/\\evil.example", b"/@evil.example"):
        location = request(site, target).header("location")
        assert location is not None
        assert location.startswith("https://example.com:8443/")


def test_non_ascii_path_bytes_are_percent_encoded_or_refused(site: Any) -> None:
    """Raw high bytes in a request line are refused (400); if they reach the redirect,
    they come back percent-encoded, and existing escapes are kept as they are."""
    assert request(site, b"/caf\xc3\xa9").status == 400
    assert redirect_location("example.com", 443, b"/caf\xc3\xa9?q=\xff\x7f") == (
        b"https://example.com/caf%C3%A9?q=%FF%7F"
    )
    kept = request(site, "/caf%C3%A9?q=%2F%20")
    assert kept.header("location") == "https://example.com:8443/caf%C3%A9?q=%2F%20"


def test_fragment_in_target_is_400(site: Any) -> None:
    """A '#' never belongs in a request target."""
    assert request(site, "/a#b").status == 400


def test_plain_http_never_sends_hsts_or_hpkp(tmp_path: Path, tokens: ChallengeTokens) -> None:
    """No response on the plain port carries HSTS or HPKP, whatever the host's settings."""
    site = make_plain_site(
        config(hsts={"max_age": 31536000, "include_subdomains": True, "preload": True}),
        tokens,
    )
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    responses = [
        request(site, "/"),
        request(site, "/", method="POST"),
        request(site, f"/.well-known/acme-challenge/{TOKEN}"),
        request(site, "/.well-known/acme-challenge/nope"),
        request(site, "/", host="unknown.example"),
        request(site, "/", host="bad host"),
    ]
    for response in responses:
        assert "strict-transport-security" not in response.headers
        assert "public-key-pins" not in response.headers
        assert "public-key-pins-report-only" not in response.headers
        assert "server" not in response.headers


def test_keep_alive_serves_several_requests(site: Any, tokens: ChallengeTokens) -> None:
    """Several requests on one connection each get their own answer."""
    tokens.publish(TOKEN, KEY_AUTHORIZATION)
    client = Client(site)
    first = client.send(b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert first.header("location") == "https://example.com:8443/a"
    second = client.send(
        f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: x.example\r\n\r\n".encode()
    )
    assert second.status == 200


@given(st.binary(max_size=60))
@settings(max_examples=300, deadline=None)
def test_location_is_always_on_our_host_and_a_valid_header(path: bytes) -> None:
    """Whatever bytes the path holds, Location is https://example.com:8443/... with
    only printable ASCII (no spaces, no line breaks)."""
    location = redirect_location("example.com", 8443, b"/" + path)
    assert location.startswith(b"https://example.com:8443/")
    assert all(0x21 <= b <= 0x7E for b in location)


# -- insecure_plain_http: routing on the plain port ---------------------------------------


LOCAL = Backend("http", "127.0.0.1", 1080)


def test_plain_router_sends_insecure_hosts_to_their_backend_but_keeps_challenges() -> None:
    """With insecure_plain_http: true, plain requests for that host (and its aliases) go to its
    backend, its ACME challenges and every other host's requests to the port-80 service."""
    router = PlainRouter(config(insecure_plain_http=True), LOCAL)
    assert router(None, b"example.com", b"/page?x=1").backend == Backend("http", "127.0.0.1", 8000)
    assert router(None, b"www.example.com:80", b"/").backend.port == 8000
    challenge = b"/.well-known/acme-challenge/abc"
    assert router(None, b"example.com", challenge).backend == LOCAL
    assert router(None, b"other.example", b"/").backend == LOCAL
    assert router(None, b"unknown.example", b"/").backend == LOCAL
    assert router(None, None, b"/").backend == LOCAL
    assert not router(None, b"example.com", b"/").headers.set  # never HSTS over plain HTTP


def test_plain_router_without_insecure_hosts_sends_everything_to_the_service() -> None:
    """By default every plain-HTTP request is answered by the port-80 service."""
    router = PlainRouter(config(), LOCAL)
    assert router(None, b"example.com", b"/").backend == LOCAL


def test_redirect_false_is_refused_in_favour_of_the_insecure_name() -> None:
    """``redirect: false`` is a config error that names the explicit insecure option."""
    with pytest.raises(ConfigError) as exc:
        config(redirect=False)
    assert "proxy.yaml: hosts.example.com.redirect: to send this host's plain-HTTP requests" in str(
        exc.value
    )
    assert "insecure_plain_http: true" in str(exc.value)


# -- request bodies -----------------------------------------------------------------------


def test_large_request_body_is_refused_with_413(site: Any) -> None:
    """A body over 64 KiB is refused before it is read, and the connection closed."""
    client = Client(site)
    head = (
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\n"
        b"Expect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_REQUEST_BODY + 1)
    )
    client.protocol.dataReceived(head)
    out = client.transport.value()
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in out
    assert client.transport.disconnecting


def test_large_chunked_body_is_refused_with_413(site: Any) -> None:
    """A chunked body that grows over 64 KiB is cut off with 413."""
    client = Client(site)
    client.protocol.dataReceived(
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 16384
    for _ in range(5):
        client.protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert client.transport.value().startswith(b"HTTP/1.1 413 ")
    assert client.transport.disconnecting


def test_small_body_is_fine(site: Any) -> None:
    """A small POST body is read and the request redirected with 308."""
    response = Client(site).send(
        b"POST /f HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert response.status == 308


# -- helpers and start-up checks ----------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "port"),
    [
        (["tcp:443"], 443),
        (["tcp:8443:interface=127.0.0.1"], 8443),
        (["tcp:port=9443:interface=::1"], 9443),
        (["tcp:interface=\\:\\:1:port=9444"], 9444),
        (["tcp6:8443"], 8443),
        (["ssl:443:privateKey=k.pem"], 443),
        (["systemd:domain=INET:index=0"], None),
        (["unix:/run/tlsproxy.sock"], None),
        (["tcp:0"], None),
        ([], None),
        (["tcp:8443", "tcp:443"], 8443),
    ],
)
def test_https_port_is_taken_from_the_first_https_listener(
    endpoints: list[str], port: int | None
) -> None:
    """The Location port follows the first listen.https endpoint when it names a port."""
    assert https_port_from_endpoints(endpoints) == port


def test_plain_problems_warn_about_insecure_hosts_and_missing_webroots(tmp_path: Path) -> None:
    """insecure_plain_http, a webroot that is not a directory and a guessed port are warned
    about."""
    doc = document(insecure_plain_http=True, webroot=str(tmp_path / "missing"))
    doc["acme"] = {"webroot": str(tmp_path)}
    doc["listen"]["https"] = ["systemd:domain=INET:index=0"]
    problems = plain_problems(config(doc))
    assert all(p.warning for p in problems)
    rendered = [p.render("proxy.yaml") for p in problems]
    assert any("hosts.example.com.insecure_plain_http: INSECURE" in r for r in rendered)
    assert any(r.startswith("proxy.yaml: hosts.example.com.webroot: ") for r in rendered)
    assert not any("acme.webroot" in r for r in rendered)
    assert any(
        r.startswith("proxy.yaml: hosts.other.example.redirect: cannot tell the HTTPS port")
        for r in rendered
    )


def test_plain_problems_are_empty_without_a_plain_listener() -> None:
    """Without listen.http there is nothing to warn about."""
    doc = document(insecure_plain_http=True)
    del doc["listen"]["http"]
    assert plain_problems(config(doc)) == []
