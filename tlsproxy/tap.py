"""Command-line options and service construction for ``twistd tlsproxy``.

The only module that knows about argv and the global reactor: it parses the
options, loads the configuration (or builds the demo), and hands both to
`tlsproxy.service`.  Every configuration or certificate problem is printed
here, one line each, and twistd exits non-zero before any port is bound.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from tlsproxy import __version__
from tlsproxy.config import Config, load_config, parse_config
from tlsproxy.errors import ConfigError

DEFAULT_DEMO_LISTEN = "tcp:8443:interface=127.0.0.1"


class Options(usage.Options):
    """``twistd tlsproxy`` options."""

    synopsis = "[--config FILE | --demo [--demo-listen ENDPOINT]]"
    longdesc = (
        "Terminate TLS for the sites in a YAML configuration file and forward their requests "
        "to plain-HTTP backends. Problems in the file or its certificates are all reported "
        "before any port is bound. --demo runs a self-signed demo site instead."
    )
    optParameters = [
        ["config", "c", None, "The YAML configuration file (see config/example.yaml)."],
        [
            "demo-listen",
            None,
            DEFAULT_DEMO_LISTEN,
            "With --demo: the HTTPS endpoint to listen on (a Twisted endpoint string).",
        ],
        [
            "demo-dir",
            None,
            None,
            "With --demo: where to write the self-signed certificate (default: a new temp dir).",
        ],
    ]
    optFlags = [
        ["demo", None, "Serve a demo page behind a self-signed certificate (no config needed)."],
    ]

    def opt_version(self) -> None:
        """Print the tlsproxy version and exit."""
        print(f"tlsproxy {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("give either --config or --demo, not both")
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("--config FILE is required (or --demo to try tlsproxy out)")


def _foreground(options: Options) -> bool:
    parent: Any = getattr(options, "parent", None)
    try:
        return bool(parent is not None and parent["nodaemon"])
    except KeyError:
        return True


def _demo_config(options: Options) -> Config:
    from twisted.internet import reactor

    from tlsproxy.demo import demo_document, demo_site, write_self_signed

    directory = options["demo-dir"] or tempfile.mkdtemp(prefix="tlsproxy-demo-")
    certificate = write_self_signed(directory)
    port: Any = reactor.listenTCP(0, demo_site(), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    document = demo_document(options["demo-listen"], certificate, port.getHost().port)
    return parse_config(document, "<demo>")


def makeService(options: Options) -> MultiService:
    """Build the tlsproxy service, or exit with every problem printed on stderr."""
    from tlsproxy.reactor import install

    reactor = install()  # first: before anything imports Twisted's default reactor

    from tlsproxy.service import build_service, load_certificates

    try:
        if options["demo"]:
            config, path = _demo_config(options), None
        else:
            config, path = load_config(options["config"]), os.path.abspath(options["config"])
        return build_service(config, reactor, foreground=_foreground(options), config_path=path)
    except ConfigError as exc:
        problems = list(exc.problems)
        if isinstance(exc.partial, Config):  # the sites that validated: check their certificates
            _, found = load_certificates(exc.partial, datetime.datetime.now(datetime.UTC))
            problems += [p for p in found if not p.warning]
        print(ConfigError(exc.source, problems), file=sys.stderr)
        print("tlsproxy: not started; fix the problems above.", file=sys.stderr)
        raise SystemExit(1) from None
