"""The container image and compose file in ``deploy/``: built from the real Dockerfile and run.

podman stands in for the Docker engine and a locally built Debian image for the
``python:3.11-slim`` base (see `tests.e2e.containers`); the Dockerfile, compose file,
example app and proxy configuration are used exactly as shipped.  Every container,
image, network, volume and daemon a test creates is removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pki
from tests.e2e.containers import Podman
from tests.e2e.harness import ROOT, free_port, need_tool

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"
#: The uid of the image's ``tlsproxy`` user, which must be able to read the mounted files.
IMAGE_UID = 10001


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """A podman with cached base images; what the module's tests make is removed after."""
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        engine.ensure_base_images()
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The tlsproxy image built from deploy/Dockerfile, unchanged."""
    return podman.build("tlsproxy", ROOT, DEPLOY / "Dockerfile")


def _config_dir(directory: Path, backend: str) -> tuple[Path, Path]:
    """deploy/tlsproxy (proxy.yaml) with a test certificate for example.com, owned by the
    image's user; returns the directory and the CA file a client should trust."""
    config = directory / "etc"
    shutil.copytree(DEPLOY / "tlsproxy", config)
    text = (config / "proxy.yaml").read_text()
    assert "http://app:8000" in text
    (config / "proxy.yaml").write_text(text.replace("http://app:8000", backend))
    ca = pki.make_ca()
    leaf = ca.issue(["example.com", "www.example.com"])
    pki.write_combined(config / "certs", leaf, name="example.com.pem")
    for path in [config, *config.rglob("*")]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    return config, pki.write_ca_file(directory, ca)


def _wait_https(
    port: int, logs: Callable[[], str], alive: Callable[[], bool], timeout: float = 30
) -> None:
    """Wait until a TLS handshake on 127.0.0.1:``port`` completes, while ``alive()``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="example.com"),
            ):
                return
        except OSError:
            if not alive():
                break
            time.sleep(0.2)
    raise AssertionError(f"no TLS handshake on port {port} within {timeout} s:\n{logs()}")


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_tool("curl"), "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_image_serves_https_as_non_root_and_stops_on_sigterm(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """The image built from deploy/Dockerfile runs tlsproxy as an unprivileged user on
    8443, answers HTTPS for the mounted certificate (here 502: no backend behind it), reports
    healthy only when a TLS handshake works, logs the host's grade, and stops with status 0
    within seconds of `docker stop` (SIGTERM to twistd as PID 1)."""
    config = podman.run("image", "inspect", image, "--format", "json").stdout
    inspected = json.loads(config)[0]
    image_config = inspected["Config"]
    assert image_config["User"] == "tlsproxy:tlsproxy"
    assert set(image_config["ExposedPorts"]) == {"8443/tcp", "8080/tcp"}
    assert set(image_config["Volumes"]) == {"/etc/tlsproxy", "/var/lib/tlsproxy"}
    assert inspected["Healthcheck"]["Test"] == ["CMD", "tlsproxy-healthcheck"], inspected.keys()

    etc, ca_file = _config_dir(tmp_path, "http://127.0.0.1:9")
    https, http = free_port(), free_port()
    container = podman.start(
        image,
        "--health-interval=disable",  # no systemd timers here; run the check by hand below
        "-p",
        f"127.0.0.1:{https}:8443",
        "-p",
        f"127.0.0.1:{http}:8080",
        "-v",
        f"{etc}:/etc/tlsproxy:ro",
    )
    _wait_https(https, lambda: podman.logs(container), lambda: podman.running(container))

    answer = _curl(
        "--cacert",
        str(ca_file),
        "--resolve",
        f"example.com:{https}:127.0.0.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{ssl_verify_result}",
        f"https://example.com:{https}/",
    )
    assert answer.stdout == "502 0", (answer, podman.logs(container))
    redirect = _curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: example.com",
        f"http://127.0.0.1:{http}/x?y=1",
    )
    assert redirect.stdout == "301 https://example.com/x?y=1", redirect

    assert podman.run("exec", container, "id", "-u").stdout.strip() == str(IMAGE_UID)
    healthy = podman.run("healthcheck", "run", container, check=False)
    assert healthy.returncode == 0, healthy
    # The check is a TLS handshake, not an open port: the plain port is open but unhealthy.
    plain = podman.run(
        "exec",
        "-e",
        "TLSPROXY_HEALTHCHECK_PORT=8080",
        container,
        "tlsproxy-healthcheck",
        check=False,
    )
    assert plain.returncode == 1, plain
    assert "unhealthy" in plain.stdout

    logs = podman.logs(container)
    assert "TLS grade example.com: A+" in logs

    started = time.monotonic()
    podman.run("stop", "-t", "20", container)
    assert time.monotonic() - started < 10
    state = podman.run("inspect", container, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert state == "0", podman.logs(container)
    assert "Server Shut Down." in podman.logs(container)


def test_image_refuses_a_bad_config_before_listening(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """A certificate the container's user cannot read stops the container at once with a
    message naming the file, instead of a proxy that half works."""
    etc, _ = _config_dir(tmp_path, "http://127.0.0.1:9")
    os.chown(etc / "certs" / "example.com.pem", 0, 0)  # root-owned 0600: unreadable for 10001
    container = podman.start(image, "--health-interval=disable", "-v", f"{etc}:/etc/tlsproxy:ro")
    podman.run("wait", container, timeout=60)
    status = podman.run("inspect", container, "--format", "{{.State.ExitCode}}").stdout.strip()
    logs = podman.logs(container)
    assert status == "1", logs
    assert "hosts.example.com.certificates[0]" in logs
    assert "tlsproxy: not started" in logs


def test_compose_runs_tlsproxy_in_front_of_django(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """`docker-compose up` with deploy/docker-compose.yml builds the example Django app,
    starts it under gunicorn behind tlsproxy, and an HTTPS request reaches Django, which
    sees the original host and knows the request was secure; `down` removes it all."""
    compose = need_tool("docker-compose")
    etc, ca_file = _config_dir(tmp_path, "http://app:8000")
    https = free_port()
    app_image = f"localhost/tlsproxy-example-app:test-{podman.tag}"
    podman.images.append(app_image)
    env = {
        **podman.env,
        "DOCKER_HOST": podman.service(tmp_path / "docker.sock"),
        "COMPOSE_PROJECT_NAME": f"tlsproxytest{podman.tag}",
        "TLSPROXY_IMAGE": image,  # built from deploy/Dockerfile by the fixture
        "EXAMPLE_APP_IMAGE": app_image,
        "TLSPROXY_HTTPS_PUBLISH": f"127.0.0.1:{https}",
        "TLSPROXY_HTTP_PUBLISH": f"127.0.0.1:{free_port()}",
        "TLSPROXY_CONFIG_DIR": str(etc),
    }

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [compose, "-f", str(DEPLOY / "docker-compose.yml"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    try:
        up = run("up", "-d")  # builds the app (the tlsproxy image exists), then starts both
        assert up.returncode == 0, up.stderr

        def proxy_alive() -> bool:
            status = podman.run(
                "ps", "-a", "--filter", f"name=tlsproxytest{podman.tag}", "--format", "{{.Status}}"
            )
            return "Exited" not in status.stdout

        _wait_https(https, lambda: run("logs").stdout, proxy_alive)
        url = f"https://example.com:{https}/hello?x=1"
        deadline = time.monotonic() + 30
        while True:  # gunicorn may still be booting its workers
            answer = _curl(
                "--cacert", str(ca_file), "--resolve", f"example.com:{https}:127.0.0.1", url
            )
            if answer.returncode == 0 and answer.stdout.startswith("{"):
                break
            assert time.monotonic() < deadline, (answer, run("logs").stdout)
            time.sleep(0.5)
        seen = json.loads(answer.stdout)
        assert seen["app"] == "django"
        assert seen["secure"] is True
        assert seen["host"] == f"example.com:{https}"
        assert seen["path"] == "/hello"
        logs = run("logs", "tlsproxy").stdout
        assert "TLS grade example.com: A+" in logs
    finally:
        down = run("down", "-v", "--rmi", "all", "-t", "5", timeout=120)
    assert down.returncode == 0, down.stderr
    left = podman.run("ps", "-a", "--format", "{{.Names}}").stdout
    assert f"tlsproxytest{podman.tag}" not in left
