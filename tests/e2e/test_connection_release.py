"""Connections are released: a client that closes after ``Connection: close`` leaves no
socket behind in the proxy."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pki
from tests.e2e.harness import need_tool

pytestmark = pytest.mark.e2e


def test_connection_close_requests_leave_no_open_sockets(
    tmp_path: Path, tlsproxy_runner: Any, echo_backend: int
) -> None:
    """After 20 curl requests with ``Connection: close`` (curl then closes at once), the
    proxy holds no more sockets than before (one pooled backend connection aside)."""
    curl = need_tool("curl")
    ca = pki.make_ca()
    pem = pki.write_combined(tmp_path, ca.issue(["a.test"]))
    proxy = tlsproxy_runner(
        {
            "hosts": {
                "a.test": {
                    "certificates": [str(pem)],
                    "backend": f"http://127.0.0.1:{echo_backend}",
                }
            }
        }
    )

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))

    before = open_fds()
    url = f"https://a.test:{proxy.https_port}/"
    resolve = f"a.test:{proxy.https_port}:127.0.0.1"
    for _ in range(20):
        subprocess.run(
            [curl, "-sS", "--cacert", str(pki.write_ca_file(tmp_path, ca)), "-o", os.devnull,
             "--max-time", "10", "-H", "Connection: close", "--resolve", resolve, url],
            check=True, timeout=30,
        )  # fmt: skip
    deadline = time.monotonic() + 5
    while open_fds() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before + 2
