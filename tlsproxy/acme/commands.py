"""``tlsproxy certs`` and ``tlsproxy acme-dry-run``: certificate status and a rehearsal.

``tlsproxy certs --config FILE [--json]`` lists every host's certificates
(names, issuer, key type, expiry, next renewal, last error) from the
configured files and the ACME state directory, with the status the running
proxy last wrote there.  It contacts nobody and binds nothing.

``tlsproxy acme-dry-run --config FILE [--directory URL] [--host NAME]``
runs the whole ACME flow (account, order, challenges, finalization) for the
``acme: true`` hosts against the staging directory (``letsencrypt-staging``
when the configuration uses Let's Encrypt production, otherwise the
configured directory or ``--directory``), answering the challenges on the
configured listeners, with a throw-away state directory: the live state is
never touched.  Stop the proxy first (or run it where the CA reaches this
machine on other ports), since it binds the same listeners.

Prints no key material.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from typing import Any

from tlsproxy.acme.store import KEY_TYPES, AcmeStore, HostStatus
from tlsproxy.certs import CertifiedKey, load_certified_key
from tlsproxy.config import ACME_DIRECTORIES, Config, load_config
from tlsproxy.errors import ConfigError


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.render(exc.source), file=sys.stderr)
        return None


def _describe(certified: CertifiedKey, now: datetime.datetime) -> dict[str, Any]:
    left = certified.not_after - now
    return {
        "key_type": certified.key_type,
        "names": list(certified.names),
        "issuer": certified.leaf.issuer.rfc4514_string(),
        "not_after": certified.not_after.isoformat(timespec="seconds"),
        "expires_in_days": round(left.total_seconds() / 86400, 1),
        "file": certified.source.cert,
    }


def host_report(config: Config, now: datetime.datetime) -> list[dict[str, Any]]:
    """Every host's certificates and ACME status, as plain data."""
    store = AcmeStore(config.acme.state_dir) if config.acme.state_dir else None
    statuses = store.statuses() if store is not None else {}
    report: list[dict[str, Any]] = []
    for host in config.hosts:
        entry: dict[str, Any] = {"host": host.name, "acme": host.acme, "certificates": []}
        problems: list[str] = []
        certificates: list[CertifiedKey] = []
        if host.acme and store is not None:
            found, loaded = store.load_certificates(host, KEY_TYPES[config.acme.key_type], now)
            certificates += found
            problems += [p.reason for p in loaded]
            status = statuses.get(host.name, HostStatus())
            entry["next_renewal"] = status.next_renewal
            entry["last_error"] = status.last_error
            entry["last_success"] = status.last_success
            if not found:
                problems.append("no certificate issued yet")
        if not certificates:
            for source in host.certificates:
                certified, loaded = load_certified_key(source)
                problems += [p.reason for p in loaded]
                if certified is not None:
                    certificates.append(certified)
            if not host.acme:
                entry["next_renewal"] = "not managed (certificate files)"
        entry["certificates"] = [_describe(c, now) for c in certificates]
        entry["problems"] = problems
        report.append(entry)
    return report


def _certs(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    report = host_report(config, datetime.datetime.now(datetime.UTC))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for entry in report:
        print(f"{entry['host']}{'  (acme)' if entry['acme'] else ''}")
        for cert in entry["certificates"]:
            print(f"  {cert['key_type']:<6} names:   {', '.join(cert['names'])}")
            print(f"         issuer:  {cert['issuer']}")
            print(f"         expires: {cert['not_after']} (in {cert['expires_in_days']} days)")
        print(f"  next renewal: {entry.get('next_renewal') or 'unknown (proxy not run yet)'}")
        print(f"  last error:   {entry.get('last_error') or 'none'}")
        for problem in entry["problems"]:
            print(f"  problem:      {problem}")
    return 0


def dry_run_directory(config: Config, override: str | None) -> str:
    """The directory a dry run talks to: ``override``, else staging for Let's Encrypt."""
    if override:
        return ACME_DIRECTORIES.get(override, override)
    if config.acme.directory == ACME_DIRECTORIES["letsencrypt"]:
        return ACME_DIRECTORIES["letsencrypt-staging"]
    return config.acme.directory


def _dry_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    hosts = [h for h in config.hosts if h.acme and (not args.host or h.name == args.host)]
    if not hosts:
        print("tlsproxy acme-dry-run: no host with acme: true to try", file=sys.stderr)
        return 1
    from tlsproxy.acme.dryrun import run

    directory = dry_run_directory(config, args.directory)
    with tempfile.TemporaryDirectory(prefix="tlsproxy-dry-run-") as state:
        return run(config, hosts, directory, state)


def register(commands: Any) -> None:
    """Add ``certs`` and ``acme-dry-run`` to the ``tlsproxy`` command's subparsers."""
    certs = commands.add_parser(
        "certs",
        help="list every host's certificates, expiry, next renewal and last ACME error",
        description="List each host's certificates (names, issuer, key type, expiry) from "
        "the configured files and the ACME state directory, with the next renewal and last "
        "error the running proxy recorded. Contacts nobody.",
    )
    certs.add_argument("--config", "-c", required=True, metavar="FILE")
    certs.add_argument("--json", action="store_true", help="print JSON instead of text")
    certs.set_defaults(run=_certs)
    dry = commands.add_parser(
        "acme-dry-run",
        help="rehearse ACME issuance against the staging directory, storing nothing",
        description="Run account registration, order, challenges and finalization for the "
        "acme: true hosts against the staging directory (or --directory), answering on the "
        "configured listeners, with a temporary state directory. Exits 0 if every host got "
        "a certificate.",
    )
    dry.add_argument("--config", "-c", required=True, metavar="FILE")
    dry.add_argument(
        "--directory",
        metavar="URL",
        help="ACME directory URL or letsencrypt-staging (default: staging for Let's "
        "Encrypt, else the configured directory)",
    )
    dry.add_argument("--host", metavar="NAME", help="only this host")
    dry.set_defaults(run=_dry_run)
