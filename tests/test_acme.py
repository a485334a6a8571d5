"""The built-in ACME client's pure parts and its schedule, in memory.

The store on a temporary directory, the renewal and back-off rules, the
service's schedule on a `twisted.internet.task.Clock` with a fake CA, the
tls-alpn-01 answer in the TLS layer, and the ``acme`` configuration.
No network, no sleeps.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from tests import pki
from tests.test_tls import World, client_context, connect, world
from tlsproxy.acme import schedule
from tlsproxy.acme.challenges import ACME_IDENTIFIER_OID, alpn_certificate
from tlsproxy.acme.issuance import IssuanceError, _retry_after
from tlsproxy.acme.manager import AcmeService, ThreadedIssuer
from tlsproxy.acme.store import AcmeStore, key_pem, temporary_certificate, write_atomic
from tlsproxy.config import ACME_DIRECTORIES, Config, parse_yaml
from tlsproxy.errors import ConfigError
from tlsproxy.plain import ChallengeTokens
from tlsproxy.tls import (
    ALPN_ACME_TLS,
    ChallengeCertificates,
    SNIConnectionCreator,
    build_server_contexts,
)

__all__ = ["world"]  # the fixture, shared with tests.test_tls

NAMES = ["site.example", "www.site.example"]
DAY = datetime.timedelta(days=1)


def _config(state: Path, extra: str = "", key_type: str = "ecdsa") -> Config:
    return parse_yaml(
        f"""
listen: {{https: ['tcp:443']}}
acme:
  agree_tos: true
  state_dir: {state}
  key_type: {key_type}
  retry_initial: 60
  retry_max: 3600
{extra}
hosts:
  site.example:
    aliases: [www.site.example]
    acme: true
    backend: http://127.0.0.1:8000
""",
        "proxy.yaml",
    )


# -- store ---------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_with_private_mode_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    """Stored files are replaced whole, readable by tlsproxy's user only."""
    path = tmp_path / "f.pem"
    path.write_bytes(b"old")
    write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["f.pem"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails (disk full, crash), the previous file is untouched."""
    path = tmp_path / "f.pem"
    path.write_bytes(b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_atomic(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.pem"]


def test_account_key_is_created_once_as_private_p256_and_reused(tmp_path: Path) -> None:
    """The ACME account key is made on first use and read back on the next start."""
    store = AcmeStore(str(tmp_path / "state"))
    key = store.account_key()
    assert key.curve.name == "secp256r1"
    assert (tmp_path / "state" / "account.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    again = AcmeStore(str(tmp_path / "state")).account_key()
    assert again.private_numbers() == key.private_numbers()


def test_a_corrupt_account_key_is_reported_not_replaced(tmp_path: Path) -> None:
    """A damaged account key stops issuance with a message; it is not silently replaced."""
    store = AcmeStore(str(tmp_path))
    (tmp_path / "account.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(ValueError, match="not a readable private key"):
        store.account_key()
    assert b"garbage" in (tmp_path / "account.key").read_bytes()


def _store_leaf(store: AcmeStore, leaf: pki.Leaf, key_type: str = "ecdsa") -> None:
    """Put ``leaf`` on disk as the stored certificate, unchecked (as a damaged file would be)."""
    store.ensure()
    write_atomic(
        store.certificate_path("site.example", key_type),
        key_pem(leaf.key) + pki.cert_pem(leaf.cert, *leaf.chain),  # type: ignore[arg-type]
    )


def test_stored_certificate_is_loaded_back(tmp_path: Path) -> None:
    """An issued certificate is served again after a restart, from the state directory."""
    config = _config(tmp_path)
    store = AcmeStore(str(tmp_path))
    leaf = pki.make_ca().issue(NAMES)
    _store_leaf(store, leaf)
    found, problems = store.load_certificates(config.hosts[0], ["ecdsa"], pki.now())
    assert problems == []
    assert [c.leaf for c in found] == [leaf.cert]
    assert os.stat(store.certificate_path("site.example", "ecdsa")).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data.replace(b"CERTIFICATE-----\nMI", b"CERTIFICATE-----\nXX", 1),
        lambda data: b"",
    ],
    ids=["truncated", "garbled", "empty"],
)
def test_a_corrupt_certificate_file_is_reported_and_never_served(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    """A damaged stored certificate is left out (and so re-issued), with a warning."""
    config = _config(tmp_path)
    store = AcmeStore(str(tmp_path))
    _store_leaf(store, pki.make_ca().issue(NAMES))
    path = Path(store.certificate_path("site.example", "ecdsa"))
    path.write_bytes(damage(path.read_bytes()))
    found, problems = store.load_certificates(config.hosts[0], ["ecdsa"], pki.now())
    assert found == []
    assert len(problems) == 1 and "re-issued" in problems[0].reason


def test_a_stored_certificate_missing_a_name_is_not_served(tmp_path: Path) -> None:
    """After an alias was added, the old certificate no longer fits and is re-issued."""
    config = _config(tmp_path)
    store = AcmeStore(str(tmp_path))
    _store_leaf(store, pki.make_ca().issue(NAMES[:1]))
    found, problems = store.load_certificates(config.hosts[0], ["ecdsa"], pki.now())
    assert found == [] and "www.site.example" in problems[0].reason


def test_temporary_certificate_covers_the_names(tmp_path: Path) -> None:
    """Until issuance, the host is served a short-lived self-signed certificate for its names."""
    host = _config(tmp_path).hosts[0]
    temporary = temporary_certificate(host, pki.now())
    sans = temporary.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == NAMES
    assert temporary.not_after - pki.now() <= datetime.timedelta(days=7)


# -- schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(("days", "renew_after"), [(90, 60), (45, 30), (6, 4)])
def test_renewal_when_a_third_of_the_lifetime_is_left(days: int, renew_after: int) -> None:
    """Without ARI, 90-day certificates renew after 60 days, 45-day ones after 30."""
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert schedule.renewal_time(start, start + days * DAY) == start + renew_after * DAY


def test_ari_window_wins_unless_it_is_past_expiry() -> None:
    """The CA's suggested time (ARI) is used; one after expiry falls back to the ⅓ rule."""
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    end = start + 90 * DAY
    assert schedule.choose_renewal(start, end, start + 10 * DAY) == start + 10 * DAY
    assert schedule.choose_renewal(start, end, end + DAY) == start + 60 * DAY
    assert schedule.choose_renewal(start, end, None) == start + 60 * DAY
    assert schedule.choose_renewal(start, end, start - DAY) == start + 60 * DAY


@given(
    failures=st.integers(min_value=1, max_value=200),
    initial=st.floats(min_value=1, max_value=600),
    cap=st.floats(min_value=600, max_value=86400),
    fraction=st.floats(min_value=0.5, max_value=1.0),
)
def test_backoff_grows_exponentially_with_jitter_and_is_capped(
    failures: int, initial: float, cap: float, fraction: float
) -> None:
    """Retries wait initial·2ⁿ⁻¹ (capped), scaled by a random factor between ½ and 1."""
    delay = schedule.backoff(failures, initial, cap, uniform=lambda a, b: fraction)
    base = min(cap, initial * 2 ** (failures - 1))
    assert delay == pytest.approx(base * fraction)
    assert delay <= cap


def test_backoff_respects_retry_after() -> None:
    """A rate-limit answer's Retry-After is never undercut."""
    assert schedule.backoff(1, 60, 3600, retry_after=7200, uniform=lambda a, b: b) == 7200
    assert schedule.backoff(1, 60, 3600, retry_after=1, uniform=lambda a, b: b) == 60


def test_retry_after_header_forms() -> None:
    """Retry-After is understood as seconds and as an HTTP date."""
    assert _retry_after("120") == 120
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    seconds = _retry_after(when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None and 3500 < seconds <= 3600
    assert _retry_after("soon") is None and _retry_after(None) is None


# -- the service on a fake clock -------------------------------------------------------------


@attrs.define
class FakeCA:
    """An `Issuer` that stores a test certificate, or fails as told."""

    store: AcmeStore
    clock: Clock
    days: float = 90
    failures: list[Exception] = attrs.field(factory=list)
    #: ARI: renew this long after the certificate's notBefore (None: no ARI).
    ari: datetime.timedelta | None = None
    issued: list[str] = attrs.field(factory=list)
    ari_queries: int = 0

    def issue(self, host: Any, key_type: str) -> Deferred[bytes]:
        self.issued.append(key_type)
        if self.failures:
            return fail(self.failures.pop(0))
        start = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        leaf = pki.make_ca().issue(
            NAMES,
            key_type="RSA" if key_type == "rsa" else "ECDSA",
            not_before=start - datetime.timedelta(hours=1),
            not_after=start + datetime.timedelta(days=self.days),
        )
        fullchain = pki.cert_pem(leaf.cert, *leaf.chain)
        try:
            self.store.save_certificate(host, key_type, leaf.key, fullchain, start)  # type: ignore[arg-type]
        except Exception as exc:
            return fail(exc)
        return succeed(fullchain)

    def renewal_info(self, fullchain: bytes) -> Deferred[datetime.datetime | None]:
        self.ari_queries += 1
        if self.ari is None:
            return succeed(None)
        leaf = x509.load_pem_x509_certificates(fullchain)[0]
        return succeed(leaf.not_valid_before_utc + self.ari)


@attrs.define
class Rig:
    clock: Clock
    ca: FakeCA
    service: AcmeService
    applied: list[int]
    store: AcmeStore

    def delay(self) -> float:
        calls = self.clock.getDelayedCalls()
        assert len(calls) == 1
        return calls[0].getTime() - self.clock.seconds()

    def status(self) -> Any:
        return self.service.slots["site.example"].status


def _rig(tmp_path: Path, key_type: str = "ecdsa", start: bool = True) -> Rig:
    clock = Clock()
    clock.advance(time.time())
    config = _config(tmp_path, key_type=key_type)
    store = AcmeStore(str(tmp_path))
    ca = FakeCA(store, clock)
    applied: list[int] = []
    service = AcmeService(lambda: config, store, ca, clock, lambda: applied.append(1))
    rig = Rig(clock, ca, service, applied, store)
    if start:
        service.startService()
        clock.advance(0)
    return rig


def test_a_new_host_is_issued_at_once_and_renewed_at_a_third_of_its_life(tmp_path: Path) -> None:
    """A host without a certificate gets one at start and it goes live; the next renewal
    comes when 30 of its 90 days are left, with ARI re-checked twice a day meanwhile."""
    rig = _rig(tmp_path)
    assert rig.ca.issued == ["ecdsa"] and rig.applied == [1]
    assert rig.status().last_error is None and rig.status().failures == 0
    rig.clock.pump([schedule.MAX_SLEEP.total_seconds()] * 119)  # 59.5 days
    assert rig.ca.issued == ["ecdsa"]
    assert rig.ca.ari_queries >= 119
    rig.clock.pump([schedule.MAX_SLEEP.total_seconds()] * 2)  # past day 60
    assert rig.ca.issued == ["ecdsa", "ecdsa"] and rig.applied == [1, 1]


def test_failures_back_off_exponentially_and_recover(tmp_path: Path) -> None:
    """Each failure doubles the wait (with jitter, capped at retry_max), records the CA's
    problem as the last error, and applies nothing; success clears it."""
    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [
        IssuanceError(f"urn:ietf:params:acme:error:serverInternal #{i}") for i in range(8)
    ]
    rig.service.startService()
    rig.clock.advance(0)
    delays = []
    for _ in range(8):
        delays.append(rig.delay())
        rig.clock.advance(delays[-1])
    for n, delay in enumerate(delays[:6], start=1):
        base = min(3600, 60 * 2 ** (n - 1))
        assert base / 2 <= delay <= base
    assert all(d <= 3600 for d in delays)
    assert rig.applied == [1]  # only the ninth attempt succeeded
    assert rig.status().failures == 0 and rig.status().last_error is None
    assert len(rig.ca.issued) == 9


def test_last_error_is_recorded_for_the_certs_command(tmp_path: Path) -> None:
    """A failure is written to the status file with the CA's problem document."""
    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [IssuanceError("the CA answered urn:ietf:params:acme:error:dns: NXDOMAIN")]
    rig.service.startService()
    rig.clock.advance(0)
    saved = AcmeStore(str(tmp_path)).statuses()["site.example"]
    assert saved.last_error is not None and "NXDOMAIN" in saved.last_error
    assert saved.failures == 1 and saved.next_renewal is not None
    assert rig.applied == []


def test_rate_limit_retry_after_is_respected(tmp_path: Path) -> None:
    """A rate-limited order is not retried before the CA's Retry-After."""
    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [IssuanceError("rateLimited", retry_after=5 * 3600)]
    rig.service.startService()
    rig.clock.advance(0)
    assert rig.delay() >= 5 * 3600 - 1 or rig.delay() == schedule.MAX_SLEEP.total_seconds()
    rig.clock.advance(4 * 3600)
    assert len(rig.ca.issued) == 1


def test_restart_reuses_the_stored_certificate_without_contacting_the_ca(tmp_path: Path) -> None:
    """After a restart a valid stored certificate is kept: no order, no CA request."""
    first = _rig(tmp_path)
    first.service.stopService()
    second = _rig(tmp_path)
    second.clock.advance(3600)
    assert second.ca.issued == [] and second.ca.ari_queries == 0
    assert second.applied == []


def test_corrupt_stored_certificate_is_reissued_on_start(tmp_path: Path) -> None:
    """A damaged stored certificate is replaced by a new one at start."""
    first = _rig(tmp_path)
    first.service.stopService()
    path = Path(first.store.certificate_path("site.example", "ecdsa"))
    path.write_bytes(path.read_bytes()[:100])
    second = _rig(tmp_path)
    assert second.ca.issued == ["ecdsa"]


def test_ari_suggested_time_is_followed(tmp_path: Path) -> None:
    """When the CA suggests renewing sooner (ARI), the certificate is renewed then."""
    rig = _rig(tmp_path, start=False)
    rig.ca.ari = DAY * 2
    rig.service.startService()
    rig.clock.advance(0)
    assert rig.ca.issued == ["ecdsa"]
    rig.clock.pump([schedule.MAX_SLEEP.total_seconds()] * 5)
    assert rig.ca.issued == ["ecdsa", "ecdsa"]


def test_both_key_types_are_issued(tmp_path: Path) -> None:
    """`key_type: both` obtains an ECDSA and an RSA certificate."""
    rig = _rig(tmp_path, key_type="both")
    assert rig.ca.issued == ["ecdsa", "rsa"]


# -- tls-alpn-01 in the TLS layer -----------------------------------------------------------


def test_tls_alpn_01_is_answered_only_for_acme_tls_handshakes(world: World) -> None:
    """A handshake offering acme-tls/1 for a name with a pending challenge gets the RFC 8737
    certificate and protocol; ordinary handshakes to the same name are not disturbed."""
    challenges = ChallengeCertificates()
    contexts, problems = build_server_contexts(world.config(), world.certificates, challenges)
    assert contexts is not None, problems
    creator = SNIConnectionCreator(contexts)
    digest = bytes(range(32))
    key, cert = alpn_certificate("example.com", digest, pki.now())
    challenges.publish("example.com", key, cert)

    def handshake(alpn: list[bytes], sni: bytes = b"example.com") -> tuple[x509.Certificate, Any]:
        context = client_context(world, alpn=alpn)
        context.set_verify(SSL.VERIFY_NONE)
        pair = connect(creator, context, sni)
        return pair.peer, pair.client.get_alpn_proto_negotiated()

    served, protocol = handshake([ALPN_ACME_TLS])
    assert protocol == ALPN_ACME_TLS
    extension = served.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert isinstance(extension.value, x509.UnrecognizedExtension)
    assert extension.critical and extension.value.value == b"\x04\x20" + digest

    served, protocol = handshake([b"http/1.1"])
    assert served == world.leaf("example.com") and protocol == b"http/1.1"

    served, protocol = handshake([ALPN_ACME_TLS], sni=b"default.test")  # nothing pending
    assert served == world.leaf("default.test") and protocol == b""

    challenges.remove("example.com")
    served, protocol = handshake([ALPN_ACME_TLS])
    assert served == world.leaf("example.com") and protocol == b""


# -- configuration ---------------------------------------------------------------------------


def test_acme_section_defaults_and_shortcuts(tmp_path: Path) -> None:
    """`letsencrypt-staging` names the staging directory; ECDSA and both challenges by default."""
    config = _config(tmp_path, extra="  directory: letsencrypt-staging\n  email: a@example.com")
    assert config.acme.directory == ACME_DIRECTORIES["letsencrypt-staging"]
    assert config.acme.key_type == "ecdsa"
    assert config.acme.challenges == ("http-01", "tls-alpn-01")
    assert config.hosts[0].acme and config.hosts[0].certificates == ()


def _errors(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "proxy.yaml")
    return str(info.value)


def test_acme_host_needs_agreement_and_state_dir() -> None:
    """Issuance needs an explicit terms-of-service agreement and a state directory."""
    text = _errors(
        "listen: {https: ['tcp:443']}\n"
        "hosts:\n  a.example: {acme: true, backend: 'http://127.0.0.1:1'}\n"
    )
    assert "proxy.yaml: acme.agree_tos: must be true" in text
    assert "proxy.yaml: acme.state_dir: is required" in text


def test_acme_settings_errors_name_the_key() -> None:
    """Every bad acme setting is reported at its key path, all in one pass."""
    text = _errors(
        "listen: {https: ['tcp:443']}\n"
        "acme: {directory: 'http://ca.example/dir', email: nobody, key_type: dsa,"
        " challenges: [dns-01], retry_initial: 0, colour: red}\n"
        "hosts:\n  a.example: {certificates: a.pem, backend: 'http://127.0.0.1:1'}\n"
    )
    for expected in (
        "acme.directory: must be an https:// URL",
        "acme.email: must be an e-mail address",
        "acme.key_type: must be one of ecdsa, rsa, both",
        "acme.challenges[0]: must be one of http-01, tls-alpn-01",
        "acme.retry_initial: must be from 1",
        "acme.colour: unknown key; allowed keys are: webroot, directory",
    ):
        assert expected in text


def test_acme_host_with_wildcard_alias_is_refused(tmp_path: Path) -> None:
    """Wildcards need dns-01, which tlsproxy does not answer: say so."""
    text = _errors(
        f"listen: {{https: ['tcp:443']}}\nacme: {{agree_tos: true, state_dir: {tmp_path}}}\n"
        "hosts:\n  a.example: {acme: true, aliases: ['*.a.example'], backend: 'http://127.0.0.1:1'}\n"
    )
    assert "hosts.a.example.acme: the alias *.a.example is a wildcard" in text


# -- tlsproxy certs ----------------------------------------------------------------------------


def test_certs_command_lists_certificate_renewal_and_last_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tlsproxy certs` shows names, issuer, key type, expiry, next renewal and the last
    error the running proxy recorded, from the state directory alone."""
    from tlsproxy.cli import main

    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [IssuanceError("the CA answered urn:ietf:params:acme:error:dns: NXDOMAIN")]
    rig.service.startService()
    rig.clock.advance(0)  # first attempt fails
    rig.clock.advance(rig.delay())  # the retry succeeds
    rig.ca.failures = [IssuanceError("the CA answered urn:ietf:params:acme:error:rateLimited")]
    config_file = tmp_path / "proxy.yaml"
    config_file.write_text(
        f"listen: {{https: ['tcp:443']}}\n"
        f"acme: {{agree_tos: true, state_dir: {tmp_path}}}\n"
        "hosts:\n  site.example: {aliases: [www.site.example], acme: true,"
        " backend: 'http://127.0.0.1:8000'}\n"
    )
    assert main(["certs", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "site.example  (acme)" in out
    assert "ECDSA  names:   site.example, www.site.example" in out
    assert "issuer:  CN=tlsproxy test intermediate" in out
    assert "next renewal: 20" in out and "last error:   none" in out

    assert main(["certs", "--config", str(config_file), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["certificates"][0]["key_type"] == "ECDSA"
    assert 89 < entry["certificates"][0]["expires_in_days"] <= 90


def test_certs_command_shows_a_host_still_waiting_for_its_first_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before issuance succeeded, the listing says so and shows the CA's last answer."""
    from tlsproxy.cli import main

    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [IssuanceError("the CA answered urn:ietf:params:acme:error:dns: NXDOMAIN")]
    rig.service.startService()
    rig.clock.advance(0)
    config_file = tmp_path / "proxy.yaml"
    config_file.write_text(
        f"listen: {{https: ['tcp:443']}}\n"
        f"acme: {{agree_tos: true, state_dir: {tmp_path}}}\n"
        "hosts:\n  site.example: {aliases: [www.site.example], acme: true,"
        " backend: 'http://127.0.0.1:8000'}\n"
    )
    assert main(["certs", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "last error:   the CA answered urn:ietf:params:acme:error:dns: NXDOMAIN" in out
    assert "problem:      no certificate issued yet" in out


def test_an_open_ari_window_renews_at_the_next_check(tmp_path: Path) -> None:
    """When the CA's renewal window for a certificate in service opens early (as after a
    revocation), the certificate is renewed at the next twice-daily check."""
    rig = _rig(tmp_path)
    rig.clock.pump([schedule.MAX_SLEEP.total_seconds()] * 20)  # 10 days, nothing due
    assert rig.ca.issued == ["ecdsa"]
    rig.ca.ari = datetime.timedelta(hours=1)  # "renew from notBefore + 1 h": already open
    rig.clock.pump([schedule.MAX_SLEEP.total_seconds(), 0])
    assert rig.ca.issued == ["ecdsa", "ecdsa"] and rig.applied == [1, 1]


def test_http01_only_without_a_port_80_listener_is_refused(tmp_path: Path) -> None:
    """Only http-01 allowed but no listen.http: issuance could never work, so say so."""
    text = _errors(
        f"listen: {{https: ['tcp:443']}}\n"
        f"acme: {{agree_tos: true, state_dir: {tmp_path}, challenges: [http-01]}}\n"
        "hosts:\n  a.example: {acme: true, backend: 'http://127.0.0.1:1'}\n"
    )
    assert "acme.challenges: http-01 needs a port-80 listener (listen.http)" in text


def test_a_certificate_that_cannot_be_stored_is_retried_and_shown(tmp_path: Path) -> None:
    """When a new certificate cannot be written (disk full), the host is not forgotten:
    the error is shown in the status, and issuance is retried after the back-off."""
    rig = _rig(tmp_path, start=False)
    rig.ca.failures = [OSError(28, "No space left on device")]
    rig.service.startService()
    rig.clock.advance(0)
    saved = AcmeStore(str(tmp_path)).statuses()["site.example"]
    assert saved.failures == 1 and "No space left on device" in (saved.last_error or "")
    assert rig.applied == []
    assert 30 <= rig.delay() <= 60  # retry_initial back-off, not silence
    rig.clock.advance(rig.delay())
    assert rig.ca.issued == ["ecdsa", "ecdsa"] and rig.applied == [1]
    assert rig.status().failures == 0 and rig.status().last_error is None


def test_an_unservable_new_certificate_never_replaces_the_good_one(tmp_path: Path) -> None:
    """If the CA returns a certificate that could not be served (here one missing an
    alias), the stored certificate is kept on disk, the problem is shown, and renewal
    is retried with back-off."""
    rig = _rig(tmp_path)
    path = Path(rig.store.certificate_path("site.example", "ecdsa"))
    good = path.read_bytes()
    NAMES.remove("www.site.example")
    try:
        rig.clock.pump([schedule.MAX_SLEEP.total_seconds()] * 121)  # past day 60
    finally:
        NAMES.append("www.site.example")
    assert path.read_bytes() == good
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left
    assert rig.status().failures >= 1
    assert "www.site.example" in (rig.status().last_error or "")
    assert rig.applied == [1]
    assert rig.delay() <= 3600  # retrying (retry_max), with the old certificate served


def test_first_start_with_several_hosts_registers_one_account(tmp_path: Path) -> None:
    """On the very first start with several ACME hosts, one account key is created and
    one connection registers it; every host then orders with that account."""
    config = parse_yaml(
        f"""
listen: {{https: ['tcp:443']}}
acme: {{agree_tos: true, state_dir: {tmp_path}}}
hosts:
  one.example: {{acme: true, backend: 'http://127.0.0.1:1'}}
  two.example: {{acme: true, backend: 'http://127.0.0.1:1'}}
""",
        "proxy.yaml",
    )
    clock = Clock()
    clock.advance(time.time())
    store = AcmeStore(str(tmp_path))
    issuer = ThreadedIssuer(
        lambda: config, store, clock, ChallengeTokens(), ChallengeCertificates()
    )
    calls: list[tuple[str, Deferred[Any]]] = []

    def thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        calls.append((f.__name__, Deferred()))
        return calls[-1][1]

    issuer._thread = thread  # type: ignore[method-assign]
    service = AcmeService(lambda: config, store, issuer, clock, lambda: None)
    service.startService()
    try:
        assert (tmp_path / "account.key").exists()  # made once, before any connection
        clock.advance(0)
        assert [name for name, _ in calls] == ["connect"]
        calls[0][1].callback(SimpleNamespace(directory_url=config.acme.directory))
        assert [name for name, _ in calls] == ["connect", "begin_order", "begin_order"]
    finally:
        service.stopService()


def test_adding_an_alias_keeps_the_stored_certificate_and_issues_at_once(tmp_path: Path) -> None:
    """After a reload that adds an alias to an ``acme: true`` host, the stored certificate
    (valid for the other names) stays in service instead of a temporary self-signed one,
    and a new certificate for all names is due at once, not at the next scheduled check."""
    from tlsproxy.service import load_certificates

    rig = _rig(tmp_path)
    assert rig.ca.issued == ["ecdsa"]
    now = datetime.datetime.fromtimestamp(rig.clock.seconds(), datetime.UTC)
    grown = parse_yaml(
        f"""
listen: {{https: ['tcp:443']}}
acme: {{agree_tos: true, state_dir: {tmp_path}, retry_initial: 60, retry_max: 3600}}
hosts:
  site.example:
    aliases: [www.site.example, shop.site.example]
    acme: true
    backend: http://127.0.0.1:8000
""",
        "proxy.yaml",
    )
    certificates, problems = load_certificates(grown, now)
    [served] = certificates["site.example"]
    assert served.names == ("site.example", "www.site.example")
    assert any("is served until a new one is issued" in p.reason for p in problems)
    rig.service.current = lambda: grown
    rig.service.refresh()
    assert [c.getTime() - rig.clock.seconds() for c in rig.clock.getDelayedCalls()] == [0]
