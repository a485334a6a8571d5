"""The ``tlsproxy`` command: small offline tools that go with the proxy.

``tlsproxy pins FILE...`` prints the pin-sha256 (base64 SHA-256 of the
SubjectPublicKeyInfo) of every key in key, CSR and certificate files, so users
can prepare HPKP backup pins and DANE ``TLSA 3 1 1`` records (``--hex``)::

    $ tlsproxy pins example.com.pem spare.key
    Y9mvm0exBk1JoQ57f9Vm28jKo5lFm/woKcVxrYxu80o=  example.com.pem: private key (ECDSA ...

``tlsproxy check --config FILE [--min-grade A]`` runs every start-up check
of the configuration and its certificates without binding anything, then
grades each host's effective TLS settings in the spirit of SSL Labs (see
`tlsproxy.audit`) and prints the reason for every cap below A+::

    $ tlsproxy check --config proxy.yaml --min-grade A
    example.com: A+
    api.example.com: A
      A   hosts.api.example.com.hsts: HSTS is off; A+ needs Strict-Transport-Security ...

It exits 1 if the configuration has errors (tlsproxy would not start) and 2
if a host grades below ``--min-grade``, so CI pipelines can gate on it.

``tlsproxy certs --config FILE`` lists every host's certificates and ACME
status; ``tlsproxy acme-dry-run --config FILE`` rehearses ACME issuance with
a throw-away state (both in `tlsproxy.acme.commands`; the dry run runs its
own reactor and binds the configured listeners).

The proxy itself runs under twistd (``twistd -n tlsproxy --config FILE``);
this module must not start a reactor or bind ports.  It prints pins, grades
and problems only, never key material.
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import sys
import warnings
from collections.abc import Sequence

from cryptography import x509

from tlsproxy import __version__
from tlsproxy.acme import commands as acme_commands
from tlsproxy.audit import GRADES, grade_config, report_lines
from tlsproxy.errors import ConfigError
from tlsproxy.pins import PinFileError, pins_in_file, primary_pin

#: Exit status of ``tlsproxy check`` when a host grades below ``--min-grade``.
EXIT_BELOW_GRADE = 2


def _pins(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            found = pins_in_file(path)
        except PinFileError as exc:
            print(f"tlsproxy pins: {exc}", file=sys.stderr)
            status = 1
            continue
        if args.primary:
            found = [primary_pin(found)]
        for item in found:
            value = item.hex if args.hex else item.pin
            print(f"{value}  {path}: {item.description}")
    return status


def _read_roots(paths: Sequence[str]) -> tuple[list[x509.Certificate], list[str]]:
    """Certificates of the system trust store (OpenSSL's default file) and ``paths``."""
    roots: list[x509.Certificate] = []
    errors: list[str] = []
    system = ssl.get_default_verify_paths().cafile
    for path, required in [(system, False), *((p, True) for p in paths)]:
        if path is None:
            continue
        try:
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old roots with odd serial numbers
                found = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as exc:
            if required:
                errors.append(f"--ca-file {path}: {getattr(exc, 'strerror', None) or exc}")
            continue
        roots += found
    return roots, errors


def _check(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from tlsproxy.config import load_config
    from tlsproxy.listeners import parse_endpoints
    from tlsproxy.pins import build_header_policies
    from tlsproxy.plain import plain_problems
    from tlsproxy.service import load_certificates
    from tlsproxy.tls import build_server_contexts, check_tls_settings

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(
            f"tlsproxy check: {args.config}: not valid; tlsproxy would not start", file=sys.stderr
        )
        return 1
    now = datetime.datetime.now(datetime.UTC)
    certificates, problems = load_certificates(config, now)
    problems += build_server_contexts(config, certificates)[1]
    problems += plain_problems(config)
    problems += build_header_policies(config, certificates)[1]
    for key in ("https", "http"):
        problems += parse_endpoints(reactor, getattr(config.listen, key), f"listen.{key}")[1]
    problems = list(dict.fromkeys(problems))
    for problem in problems:
        level = "warning" if problem.warning else "error"
        print(f"{level}: {problem.render(config.source)}", file=sys.stderr)
    roots, root_errors = _read_roots(args.ca_file)
    for error in root_errors:
        print(f"tlsproxy check: {error}", file=sys.stderr)
    if root_errors:
        return 1
    params = check_tls_settings(config.tls)[0]
    errors = [p for p in problems if not p.warning]
    if params is None:
        print(f"tlsproxy check: {config.source}: {_errors(errors)}; not graded", file=sys.stderr)
        return 1
    dh_bits = _dh_bits(params.dhparam)
    grades = grade_config(
        config,
        certificates,
        params,
        now,
        dh_bits=dh_bits,
        trust_roots=None if args.no_trust_check else roots,
    )
    for grade in grades:
        print("\n".join(report_lines(grade)))
    if errors:
        print(
            f"tlsproxy check: {config.source}: {_errors(errors)}; tlsproxy would not start",
            file=sys.stderr,
        )
        return 1
    below = [g for g in grades if args.min_grade and not g.at_least(args.min_grade)]
    if below:
        names = ", ".join(f"{g.host} ({g.grade})" for g in below)
        print(f"tlsproxy check: below {args.min_grade}: {names}", file=sys.stderr)
        return EXIT_BELOW_GRADE
    return 0


def _errors(errors: Sequence[object]) -> str:
    return f"{len(errors)} error{'s' if len(errors) != 1 else ''}"


def _dh_bits(path: str | None) -> int | None:
    from tlsproxy.tls import dh_prime_bits

    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return dh_prime_bits(f.read())
    except (OSError, ValueError):
        return None  # reported by check_tls_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsproxy",
        description="Offline tools for tlsproxy. The proxy itself runs as "
        "`twistd -n tlsproxy --config FILE`.",
    )
    parser.add_argument("--version", action="version", version=f"tlsproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pins = commands.add_parser(
        "pins",
        help="print the pin-sha256 of keys, CSRs and certificates",
        description="Print one line per public key found in each FILE (PEM or DER private "
        "key, public key, certificate request or certificate): the base64 SHA-256 of its "
        "SubjectPublicKeyInfo, as HPKP's pin-sha256 and hpkp.backup_pins expect, then the "
        "file and what the key was found in. Equal to `openssl pkey -pubout -outform DER "
        "| openssl dgst -sha256 -binary | base64`. Exits 1 if a file yields no pin.",
    )
    pins.add_argument("files", nargs="+", metavar="FILE")
    pins.add_argument(
        "--hex",
        action="store_true",
        help="print the SHA-256 in hex instead (the data of a DANE TLSA 3 1 1 record)",
    )
    pins.add_argument(
        "--primary",
        "-1",
        action="store_true",
        help="only the pin each file stands for as a backup pin: its private key's, "
        "else its CSR's, else its first certificate's",
    )
    pins.set_defaults(run=_pins)
    check = commands.add_parser(
        "check",
        help="validate a configuration and grade each host's TLS settings",
        description="Run every start-up check of the configuration and its certificates "
        "without binding anything, then grade each host's effective TLS settings in the "
        "spirit of SSL Labs (protocols, key exchange, ciphers, certificate, HSTS) and print "
        "why a grade is below A+. Exits 1 if tlsproxy would refuse to start, 2 if a host "
        "grades below --min-grade, else 0.",
    )
    check.add_argument("--config", "-c", required=True, metavar="FILE", help="proxy.yaml")
    check.add_argument(
        "--min-grade",
        choices=GRADES[:-1],
        default=None,
        help="exit 2 if any host grades below this (T, an untrusted certificate, is below all)",
    )
    check.add_argument(
        "--ca-file",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM roots to trust besides the system's (a private CA); repeatable",
    )
    check.add_argument(
        "--no-trust-check",
        action="store_true",
        help="do not check that certificate chains lead to a trusted root",
    )
    check.set_defaults(run=_check)
    acme_commands.register(commands)  # certs, acme-dry-run (issue 5)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tlsproxy`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
