"""The ACME state directory: account key, certificates and status, on disk.

Layout of ``acme.state_dir``::

    account.key                 ECDSA P-256 account key (PEM, 0600)
    account.json                the account URL per directory
    certs/HOST.ecdsa.pem        key, leaf and intermediates of one certificate (0600)
    certs/HOST.rsa.pem
    status.json                 per host: next renewal, ARI window, last error

Every file is written atomically (temporary file in the same directory,
fsync, rename, fsync of the directory) with mode 0600, so a crash leaves the
old file or the new one, never half of one.  A certificate file that cannot
be read or does not fit its host is reported and treated as missing (it is
re-issued), never served.

Blocking file I/O only: call it from a thread or at start-up, never from a
TLS callback.  It must never log or return key material in messages.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tlsproxy.certs import (
    CertifiedKey,
    ServerKey,
    check_certified_key,
    check_validity,
    load_certified_key,
    self_signed,
)
from tlsproxy.config import CertificateSource, Config, HostConfig
from tlsproxy.errors import Problem

#: ``acme.key_type`` → the certificate key types of a host, in serving order.
KEY_TYPES: Mapping[str, tuple[str, ...]] = {
    "ecdsa": ("ecdsa",),
    "rsa": ("rsa",),
    "both": ("ecdsa", "rsa"),
}
RSA_BITS = 2048
#: Lifetime of the temporary self-signed certificate served until issuance.
TEMPORARY_LIFETIME = datetime.timedelta(days=7)


def write_atomic(
    path: str, data: bytes, mode: int = 0o600, check: Callable[[str], object] | None = None
) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory.

    :param check: called with the temporary file's path before the rename; if
        it raises, the temporary file is removed and ``path`` is left as it was.
    :raises OSError: if any step fails (the old file is then untouched).
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_private_key(key_type: str) -> ServerKey:
    """A fresh certificate key: ECDSA P-256 (``ecdsa``) or RSA 2048 (``rsa``)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ServerKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (for files and CSRs only, never logs)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@attrs.frozen
class HostStatus:
    """What the running proxy last knew about one host's certificate."""

    next_renewal: str | None = None
    #: The renewal time the CA suggested through ARI for the current certificate.
    ari_renewal: str | None = None
    last_error: str | None = None
    last_attempt: str | None = None
    last_success: str | None = None
    failures: int = 0


@attrs.define
class AcmeStore:
    """The files under one ``acme.state_dir``."""

    directory: str

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def ensure(self) -> None:
        """Create the directory tree, readable by this user only.

        :raises OSError: if it cannot be created.
        """
        for path in (self.directory, self._path("certs")):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)

    # -- account -------------------------------------------------------------------

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, created (ECDSA P-256) and stored on first use.

        :raises OSError: if it cannot be read or written.
        :raises ValueError: if the stored key is corrupt or not ECDSA P-256
            (it is left in place for the operator to inspect).
        """
        path = self._path("account.key")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.ensure()
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(path, key_pem(key))
            return key
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable private key ({exc})") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
            raise ValueError(f"{path} is not an ECDSA P-256 key")
        return loaded

    def account_url(self, directory_url: str) -> str | None:
        """The account URL registered at ``directory_url``, if recorded."""
        return self._read_json("account.json").get(directory_url)

    def save_account_url(self, directory_url: str, url: str) -> None:
        accounts = self._read_json("account.json")
        accounts[directory_url] = url
        self._write_json("account.json", accounts)

    # -- certificates ----------------------------------------------------------------

    def certificate_path(self, host: str, key_type: str) -> str:
        """Where the certificate of ``host`` with ``key_type`` (``ecdsa``/``rsa``) lives."""
        return self._path("certs", f"{host}.{key_type}.pem")

    def save_certificate(
        self,
        host: HostConfig,
        key_type: str,
        key: ServerKey,
        fullchain: bytes,
        now: datetime.datetime,
    ) -> str:
        """Store key and full chain in one file, atomically; return its path.

        The new file is first written next to the live one and checked as it
        will be served (the key fits the leaf, the chain, validity at ``now``,
        every name of ``host``); only then does it replace the live file.

        :raises ValueError: if the new certificate cannot be served (the
            stored one is kept).
        :raises OSError: if it cannot be written (the stored one is kept).
        """
        self.ensure()
        path = self.certificate_path(host.name, key_type)

        def check(temporary: str) -> None:
            certified, reasons = self._check(host, key_type, temporary, now)
            if certified is None:
                raise ValueError(
                    f"the new {key_type.upper()} certificate cannot be served and was not "
                    f"stored (the current one stays): {reasons}"
                )

        write_atomic(path, key_pem(key) + fullchain, check=check)
        return path

    def _check(
        self,
        host: HostConfig,
        key_type: str,
        path: str,
        now: datetime.datetime,
        *,
        all_names: bool = True,
    ) -> tuple[CertifiedKey | None, str]:
        """Load ``path`` as ``host``'s ``key_type`` certificate: it, or None and why not.

        With ``all_names`` false, a certificate that lacks some of the host's
        names (an alias added since it was issued) still passes.
        """
        where = f"hosts.{host.name}.acme"
        source = CertificateSource(key=path, cert=path, chain=None, path=where)
        certified, loaded_problems = load_certified_key(source)
        errors = [p for p in loaded_problems if not p.warning]
        if certified is not None and certified.key_type.lower() != key_type:
            errors.append(Problem(where, f"holds a {certified.key_type} key"))
        if certified is not None and not errors:
            checks = (
                check_certified_key(certified, host.names, now)
                if all_names
                else check_validity(certified, now)
            )
            errors = [p for p in checks if not p.warning]
        if certified is None or errors:
            return None, "; ".join(p.reason for p in errors) or "no certificate in it"
        return certified, ""

    def load_certificates(
        self,
        host: HostConfig,
        key_types: Sequence[str],
        now: datetime.datetime,
        *,
        serving: bool = False,
    ) -> tuple[list[CertifiedKey], list[Problem]]:
        """The stored certificates of ``host`` that are safe to serve.

        A missing file is not a problem (nothing was issued yet).  A file that
        is unreadable, corrupt, of the wrong key type, expired or missing one
        of the host's names is reported as a warning and left out: the ACME
        service issues a new one.  With ``serving``, a certificate that only
        lacks some names (an alias added to the config) stays in service, with
        a warning, until its replacement is issued.
        """
        found: list[CertifiedKey] = []
        problems: list[Problem] = []
        for key_type in key_types:
            path = self.certificate_path(host.name, key_type)
            if not os.path.exists(path):
                continue
            certified, reasons = self._check(host, key_type, path, now)
            if certified is None and serving:
                certified, _ = self._check(host, key_type, path, now, all_names=False)
                if certified is not None:
                    problems.append(
                        Problem(
                            f"hosts.{host.name}.acme",
                            f"the stored certificate {path} is served until a new one is "
                            f"issued: {reasons}",
                            warning=True,
                        )
                    )
                    found.append(certified)
                    continue
            if certified is None:
                problems.append(
                    Problem(
                        f"hosts.{host.name}.acme",
                        f"the stored certificate {path} is not served and will be "
                        f"re-issued: {reasons}",
                        warning=True,
                    )
                )
                continue
            found.append(certified)
        return found, problems

    # -- status ----------------------------------------------------------------------

    def statuses(self) -> dict[str, HostStatus]:
        """The recorded status of every host (empty when none was written)."""
        out: dict[str, HostStatus] = {}
        for host, fields in self._read_json("status.json").items():
            if isinstance(fields, dict):
                known = {f.name for f in attrs.fields(HostStatus)}
                out[host] = HostStatus(**{k: v for k, v in fields.items() if k in known})
        return out

    def save_statuses(self, statuses: Mapping[str, HostStatus]) -> None:
        self.ensure()
        self._write_json("status.json", {h: attrs.asdict(s) for h, s in statuses.items()})

    # -- helpers ---------------------------------------------------------------------

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            with open(self._path(name), "rb") as f:
                value = json.load(f)
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_json(self, name: str, value: Mapping[str, Any]) -> None:
        text = json.dumps(value, indent=2, sort_keys=True) + "\n"
        write_atomic(self._path(name), text.encode())


def temporary_certificate(host: HostConfig, now: datetime.datetime) -> CertifiedKey:
    """A self-signed ECDSA certificate for ``host``'s names, made in memory.

    Served until the first certificate is issued, so the HTTPS listener (and
    tls-alpn-01) work from the start; browsers show it as untrusted.
    """
    key, cert = self_signed(
        [x509.DNSName(n) for n in host.names],
        "tlsproxy temporary certificate",
        now,
        TEMPORARY_LIFETIME,
    )
    where = f"hosts.{host.name}.acme"
    return CertifiedKey(
        key=key,
        leaf=cert,
        chain=(),
        key_type="ECDSA",
        names=tuple(host.names),
        not_after=cert.not_valid_after_utc,
        source=CertificateSource(key="(memory)", cert="(memory)", chain=None, path=where),
    )


def acme_store(config: Config) -> AcmeStore | None:
    """The store of ``config``, or None when no host has ``acme: true``."""
    if config.acme.state_dir is None or not any(h.acme for h in config.hosts):
        return None
    return AcmeStore(config.acme.state_dir)


def acme_certificates(
    config: Config, host: HostConfig, now: datetime.datetime
) -> tuple[list[CertifiedKey], list[Problem]]:
    """The stored, servable ACME certificates of ``host`` (see `AcmeStore.load_certificates`)."""
    store = acme_store(config)
    if store is None:
        return [], []
    return store.load_certificates(host, KEY_TYPES[config.acme.key_type], now, serving=True)
