"""The ``tlsproxy`` command: small offline tools that go with the proxy.

``tlsproxy pins FILE...`` prints the pin-sha256 (base64 SHA-256 of the
SubjectPublicKeyInfo) of every key in key, CSR and certificate files, so users
can prepare HPKP backup pins and DANE ``TLSA 3 1 1`` records (``--hex``)::

    $ tlsproxy pins example.com.pem spare.key
    Y9mvm0exBk1JoQ57f9Vm28jKo5lFm/woKcVxrYxu80o=  example.com.pem: private key (ECDSA ...

The proxy itself runs under twistd (``twistd -n tlsproxy --config FILE``);
this module must not start a reactor or bind ports.  It prints pins only,
never key material.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tlsproxy import __version__
from tlsproxy.pins import PinFileError, pins_in_file, primary_pin


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tlsproxy`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
