"""Debian's ``pebble`` ACME server and ``pebble-challtestsrv`` DNS, for end-to-end tests.

`Pebble.start` runs both (pebble in strict mode with its own HTTPS
certificate from `tests.pki`, every test name resolving to 127.0.0.1 through
challtestsrv); its http-01 and tls-alpn-01 validations go to the given
tlsproxy ports.  `Pebble.stop`/`Pebble.restart` simulate a CA outage.
`Pebble.root` fetches the root that signs issued certificates (management
API ``/roots/0``).  Everything binds to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tests.e2e.harness import free_port, need_tool, wait_for_port


class Processes:
    """Child processes started by a test, all stopped at the end (bounded waits)."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append((proc, log))
        return proc

    @staticmethod
    def stop_one(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop(self) -> None:
        for proc, _ in self.procs:
            self.stop_one(proc)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')}"
            for log in dict.fromkeys(log for _, log in self.procs)
        )


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop()


def post_json(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


class Pebble:
    """A pebble CA and its challtestsrv DNS, validating against tlsproxy's ports."""

    def __init__(
        self,
        processes: Processes,
        directory: Path,
        names: Sequence[str],
        *,
        http_port: int,
        https_port: int,
        validity_seconds: int | None = None,
    ) -> None:
        self.processes = processes
        self.directory = directory
        self.names = list(names)
        self.http_port = http_port
        self.https_port = https_port
        self.validity_seconds = validity_seconds
        self.port, self.management_port = free_port(), free_port()
        self.dns_port, self.dns_management_port = free_port(), free_port()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PEBBLE_", "REQUESTS_"))
        }
        self.proc: subprocess.Popen[bytes] | None = None
        ca = pki.make_ca(fresh=True)
        leaf = ca.issue(["localhost"], ip_addresses=["127.0.0.1"])
        files = pki.write_separate(directory, leaf, prefix="pebble")
        self.cert = pki.write_file(
            directory / "pebble-fullchain.pem", pki.cert_pem(leaf.cert, *leaf.chain)
        )
        self.key = files.key
        #: The CA that signs pebble's own HTTPS certificate (trust it for the directory).
        self.https_ca = pki.write_ca_file(directory, ca, name="pebble-https-ca.pem")

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        """Start challtestsrv (once) and pebble."""
        pebble = need_tool("pebble", "/usr/bin/pebble")
        challtestsrv = need_tool("pebble-challtestsrv", "/usr/bin/pebble-challtestsrv")
        if not any("challtestsrv" in str(log) for _, log in self.processes.procs):
            self.processes.start(
                [
                    challtestsrv,
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "",
                    "-https01", "",
                    "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{self.dns_management_port}",
                    "-defaultIPv4", "127.0.0.1",
                    "-defaultIPv6", "",
                ],
                self.directory / "challtestsrv.log",
                self.env,
            )  # fmt: skip
            wait_for_port(self.dns_management_port, None)
            for name in self.names:
                post_json(
                    f"http://127.0.0.1:{self.dns_management_port}/add-a",
                    {"host": name, "addresses": ["127.0.0.1"]},
                )
        settings: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.cert),
            "privateKey": str(self.key),
            "httpPort": self.http_port,
            "tlsPort": self.https_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds is not None:
            settings["certificateValidityPeriod"] = self.validity_seconds
        config = self.directory / "pebble.json"
        config.write_text(json.dumps({"pebble": settings}))
        env = self.env | {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.proc = self.processes.start(
            [
                pebble, "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}",
                "-strict",
            ],
            self.directory / "pebble.log",
            env,
        )  # fmt: skip
        wait_for_port(self.port, self.proc)
        wait_for_port(self.management_port, self.proc)

    def stop(self) -> None:
        """Stop pebble (not the DNS): the CA is unreachable until `start`."""
        if self.proc is not None:
            Processes.stop_one(self.proc)
            self.proc = None

    def log(self) -> str:
        path = self.directory / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def root(self) -> Path:
        """Pebble's current issuing root (it makes a new one each start), as a file."""
        context = ssl.create_default_context(cafile=str(self.https_ca))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{self.management_port}/roots/0", context=context, timeout=10
        ) as response:
            path = self.directory / "pebble-root.pem"
            path.write_bytes(response.read())
        return path
