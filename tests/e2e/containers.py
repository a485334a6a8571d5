"""Building and running the project's real Dockerfile with podman in end-to-end tests.

There is no Docker engine on the test machines and base images cannot be pulled, so
`Podman` runs podman (with runc and netavark) against a storage directory of its own
under ``~/.cache/tlsproxy-tests/podman``, where `Podman.ensure_base_images` builds, once
and then reuses, a Debian bookworm image with ``debootstrap`` and a stand-in for the
Dockerfile's ``FROM python:3.11-slim`` (Debian's Python 3.11 with pip and venv).  The
Debian mirror is the one the machine's own apt sources name, read at run time.

Everything a test creates (containers, images, networks, the API service) is recorded
and removed by `Podman.cleanup`; the cached base images stay.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.e2e.harness import need_tool

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlsproxy-tests"
#: The name the Dockerfile's FROM uses, and the Debian image it is made from.
PYTHON_IMAGE = "docker.io/library/python:3.11-slim"
DEBIAN_IMAGE = "docker.io/library/debian:bookworm-slim"
TOOLS = ("podman", "runc", "debootstrap", "netavark", "aardvark-dns")

_CMD = 'CMD ["/bin/bash"]'
_PATH = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STANDIN = """\
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        python3 python3-pip python3-venv ca-certificates > /dev/null \\
 && ln -s /usr/bin/python3 /usr/local/bin/python \\
 && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
CMD ["python3"]
"""


def debian_mirror() -> str:
    """The first Debian mirror URI in this machine's apt sources."""
    for path in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]:
        with contextlib.suppress(OSError):
            text = Path(path).read_text()
            found = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M
            )
            if found:
                return found.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list(.d)")


def _tool_dir(name: str) -> str:
    for where in ("/usr/libexec/podman", "/usr/lib/podman"):
        if os.access(f"{where}/{name}", os.X_OK):
            return where
    return ""


class Podman:
    """podman with this project's own configuration and storage, and what a test made."""

    def __init__(self, work: Path) -> None:
        for tool in TOOLS:
            need_tool(tool, f"{_tool_dir(tool)}/{tool}" if _tool_dir(tool) else None)
        self.podman = need_tool("podman")
        self.work = work
        self.home = CACHE / "podman"
        self.home.mkdir(parents=True, exist_ok=True)
        nofile = min(20000, _hard_nofile())
        conf = self.home / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
            "[network]\n"
            'network_backend = "netavark"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        storage = self.home / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.home / "storage"}"\n'
            f'runroot = "{self.home / "run"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "BUILDAH_FORMAT": "docker",  # keeps HEALTHCHECK (OCI images drop it)
        }
        if os.geteuid() != 0:
            need_tool("root (rootful podman)", "/nonexistent")
        self.tag = uuid.uuid4().hex[:10]
        self.containers: list[str] = []
        self.images: list[str] = []
        self.networks: list[str] = []
        self._services: list[subprocess.Popen[bytes]] = []
        self._dangling_before: set[str] = set()

    # -- running podman ---------------------------------------------------------------

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        input: bytes | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``; raise with its output if it fails and ``check``."""
        done = subprocess.run(
            [self.podman, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
            input=input.decode() if input is not None else None,
            text=True,
            cwd=cwd,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    # -- cached base images ---------------------------------------------------------

    def dangling(self) -> set[str]:
        """IDs of untagged images (left by builds through the Docker API)."""
        done = self.run("images", "-q", "--no-trunc", "-f", "dangling=true", check=False)
        return set(done.stdout.split())

    def ensure_base_images(self) -> None:
        """Build the Debian base and the ``python:3.11-slim`` stand-in unless cached."""
        self._dangling_before = self.dangling()
        with open(self.home / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.image_exists(PYTHON_IMAGE):
                return
            if not self.image_exists(DEBIAN_IMAGE):
                self._import_debian()
            context = Path(tempfile.mkdtemp(dir=self.work))
            (context / "Containerfile").write_text(_STANDIN)
            self.run(
                "build",
                "--pull=never",
                "--layers=false",
                "-t",
                PYTHON_IMAGE,
                str(context),
                timeout=300,
            )

    def _import_debian(self) -> None:
        rootfs = self.home / "rootfs"
        mirror = debian_mirror()
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(
            [need_tool("debootstrap"), "--variant=minbase", "bookworm", str(rootfs), mirror],
            check=True,
            capture_output=True,
            timeout=300,
        )
        try:
            for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
                for path in glob.glob(str(rootfs / pattern)):
                    if os.path.isfile(path):
                        os.unlink(path)
            # pip and apt inside builds must trust what this machine trusts.
            bundles = ["/etc/ssl/certs/ca-certificates.crt"]
            bundles += glob.glob("/usr/local/share/ca-certificates/*.crt")
            for bundle in bundles:
                target = rootfs / bundle.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(bundle, target)
            tar = subprocess.Popen(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
            )
            subprocess.run(
                [self.podman, "import", "--change", _CMD, "--change", _PATH, "-", DEBIAN_IMAGE],
                stdin=tar.stdout,
                env=self.env,
                check=True,
                capture_output=True,
                timeout=300,
            )
            tar.wait(timeout=60)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)

    # -- what a test makes ----------------------------------------------------------

    def build(self, name: str, context: Path, dockerfile: Path | None = None) -> str:
        """Build an image from ``context`` (never pulling); return its unique tag."""
        image = f"localhost/{name}:test-{self.tag}"
        self.images.append(image)
        args = ["build", "--pull=never", "--layers=false", "--format=docker", "-t", image]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        self.run(*args, str(context), timeout=600)
        return image

    def start(self, image: str, *args: str, name: str | None = None) -> str:
        """``podman run -d`` ``image`` with ``args`` (options first); return the container."""
        name = name or f"tlsproxy-test-{self.tag}-{len(self.containers)}"
        self.containers.append(name)
        self.run("run", "-d", "--name", name, *args, image)
        return name

    def running(self, container: str) -> bool:
        done = self.run("inspect", container, "--format", "{{.State.Running}}", check=False)
        return done.stdout.strip() == "true"

    def logs(self, container: str) -> str:
        done = self.run("logs", container, check=False)
        return done.stdout + done.stderr

    def service(self, socket_path: Path) -> str:
        """Start podman's Docker-compatible API on ``socket_path``; return DOCKER_HOST."""
        proc = subprocess.Popen(
            [self.podman, "system", "service", "--time=0", f"unix://{socket_path}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._services.append(proc)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("podman system service did not start")
            time.sleep(0.05)
        return f"unix://{socket_path}"

    def cleanup(self) -> None:
        """Remove every container, network and image this object made; stop its services."""
        for container in self.containers:
            self.run("rm", "-f", "-v", "-t", "0", container, check=False)
        for network in self.networks:
            self.run("network", "rm", "-f", network, check=False)
        for image in self.images:
            self.run("rmi", "-f", image, check=False)
        for image in self.dangling() - self._dangling_before:
            self.run("rmi", image, check=False)  # not -f: another run may be using it
        for proc in self._services:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _hard_nofile() -> int:
    import resource

    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


@contextlib.contextmanager
def podman_session(work: Path) -> Iterator[Podman]:
    """A `Podman` with its base images ready; everything it made is removed afterwards."""
    podman = Podman(work)
    try:
        podman.ensure_base_images()
        yield podman
    finally:
        podman.cleanup()


__all__: Sequence[str] = ["Podman", "debian_mirror", "podman_session"]
