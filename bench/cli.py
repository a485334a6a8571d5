"""``python -m bench``: run the side-by-side benchmark and write its results.

One job: orchestrate a run.  It makes a private run directory with the test
certificate and a 64 MiB body, starts the backends (nginx, and the WebSocket
echo server `bench.wsecho`) and every peer (nginx, HAProxy, tlsproxy, the
minimal relay `bench.minimal_relay`, stock twisted.web.proxy) pinned as
`Pinning` says, checks what TLS each negotiates, measures every peer the same
way in turns (each round rotates the order; the minimal relay only for
keep-alive requests), records CPU and memory from ``/proc``, optionally
profiles tlsproxy with py-spy, prints the table and writes JSON and Markdown.

Every process it starts is stopped when it ends, fails or is interrupted
(`ProcessGroup`); every tool it runs has a time limit; all traffic goes to
127.0.0.1.  It does not install anything: ``bench/run`` does that first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml

from bench import configs, measure, profile, report
from bench.processes import Pinning, ProcessGroup, Server, free_port, pinned

ROOT = Path(__file__).resolve().parents[1]
ALL_PEERS = ("nginx", "haproxy", "tlsproxy", "minimal", "twisted", "nginx-2w", "tlsproxy-2w")
#: Peers running two worker processes on all CPUs (not pinned to the proxy's CPU).
MULTI_WORKER_PEERS = ("nginx-2w", "tlsproxy-2w")
#: Stock twisted.web.proxy neither proxies WebSockets nor resumes TLS sessions (Twisted's
#: ``CertificateOptions`` turns both session IDs and tickets off): not measured for it.
NO_WEBSOCKET_PEERS = ("twisted",)
#: Not measured for resumed handshakes: stock twisted.web.proxy (as above), and tlsproxy
#: with 2 workers, where a session resumes only in the worker that issued it (README,
#: "Workers"), so about half of the offered sessions resume.
NO_RESUMPTION_PEERS = ("twisted", "tlsproxy-2w")
#: Measured for keep-alive requests only: the minimal relay (`bench.minimal_relay`), which
#: shows what tlsproxy's engine costs per request; it has no other features to measure.
KEEPALIVE_ONLY_PEERS = ("minimal",)


def _nginx_command(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with ``conf``, logging errors to stderr."""
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]


@attrs.frozen
class Settings:
    """How long and how hard each measurement runs."""

    mode: str
    rounds: int
    duration: float
    warmup: float
    connections: int
    threads: int
    handshake_connections: int
    bulk_repetitions: int

    def describe(self) -> str:
        return (
            f"{self.rounds} round(s); wrk {self.threads} thread, {self.connections} connections, "
            f"{self.duration:g} s (+{self.warmup:g} s warm-up); handshakes "
            f"{self.handshake_connections} connections, {self.duration:g} s; bulk "
            f"{self.bulk_repetitions} transfer(s) each way per round, median"
        )


MODES = {
    "short": Settings("short", 1, 4.0, 1.0, 64, 1, 32, 2),
    "full": Settings("full", 5, 8.0, 2.0, 64, 1, 32, 2),
}


def _version(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = platform.platform()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem_gib:.0f} GiB, {debian}, Linux {platform.release()}"
    )


def versions() -> str:
    import OpenSSL.SSL

    import twisted

    pyopenssl = OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode()
    return "; ".join(
        [
            _version(["nginx", "-v"]).replace("nginx version: ", ""),
            " ".join(_version(["haproxy", "-v"]).split()[:3]),
            _version(["wrk", "-v"]).split(" [")[0],
            f"{_version(['openssl', 'version'])} (system: nginx, HAProxy, wrk, curl)",
            f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"{pyopenssl} (tlsproxy, twisted.web, handshake client)",
        ]
    )


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews absolute figures)."""
    return os.getloadavg()[0]


class Run:
    """One benchmark run: servers, measurements and the results document."""

    def __init__(self, ns: argparse.Namespace, settings: Settings, workdir: Path) -> None:
        self.ns = ns
        self.settings = settings
        self.workdir = workdir
        self.peers: list[str] = ns.peers
        self.pinning = Pinning.detect() if not ns.no_pin else Pinning(None, None)
        self.servers: dict[str, Server] = {}
        self.ports: dict[str, int] = {}
        self.raw: dict[str, dict[str, list[Any]]] = {
            p: {
                "keepalive": [],
                "handshake": [],
                "resumption": [],
                "websocket": [],
                "download": [],
                "upload": [],
            }
            for p in self.peers
        }
        self.metrics: dict[str, dict[str, Any]] = {p: {} for p in self.peers}
        self.tls: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.profile_text = ""

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[bench {stamp}] {message}", flush=True)

    # -- set-up -----------------------------------------------------------------------

    def prepare_files(self) -> None:
        self.pki = configs.write_pki(self.workdir)
        docroot = self.workdir / "www"
        docroot.mkdir()
        self.big = docroot / "big.bin"
        chunk = os.urandom(1024 * 1024)
        with open(self.big, "wb") as f:
            for _ in range(configs.BIG_SIZE // len(chunk)):
                f.write(chunk)
        self.upload = self.big
        self.wrk_script = measure.write_wrk_script(self.workdir)

    def start_servers(self, group: ProcessGroup) -> None:
        others, proxy_cpu = self.pinning.others, self.pinning.proxy
        backend_port = free_port()
        conf = self.workdir / "backend.conf"
        conf.write_text(
            configs.nginx_backend_conf(
                prefix=self.workdir, port=backend_port, docroot=self.workdir / "www"
            )
        )
        self.log(f"starting the backend (nginx) on port {backend_port}")
        group.start(
            "backend",
            _nginx_command(self.workdir, conf),
            port=backend_port,
            cpus=others,
        )
        ws_port = free_port()
        self.log(f"starting the WebSocket backend (bench.wsecho) on port {ws_port}")
        group.start(
            "ws-backend",
            [sys.executable, "-m", "bench.wsecho", "--port", str(ws_port)],
            port=ws_port,
            cpus=others,
            cwd=ROOT,
        )
        for peer in self.peers:
            port = free_port()
            self.ports[peer] = port
            command: list[str]
            cwd: Path | None = None
            workers = 2 if peer in MULTI_WORKER_PEERS else 1
            if peer in ("nginx", "nginx-2w"):
                conf = self.workdir / f"{peer}.conf"
                conf.write_text(
                    configs.nginx_proxy_conf(
                        prefix=self.workdir / peer,
                        port=port,
                        backend_port=backend_port,
                        pki=self.pki,
                        workers=workers,
                        ws_port=ws_port,
                    )
                )
                (self.workdir / peer).mkdir(exist_ok=True)
                command = _nginx_command(self.workdir / peer, conf)
            elif peer == "haproxy":
                conf = self.workdir / "haproxy.cfg"
                conf.write_text(
                    configs.haproxy_conf(
                        port=port, backend_port=backend_port, pki=self.pki, ws_port=ws_port
                    )
                )
                command = ["haproxy", "-db", "-f", str(conf)]
            elif peer in ("tlsproxy", "tlsproxy-2w", "minimal"):
                conf = self.workdir / f"{peer}.yaml"
                conf.write_text(
                    yaml.safe_dump(
                        configs.tlsproxy_config(
                            port=port,
                            backend_port=backend_port,
                            pki=self.pki,
                            workers=workers,
                            ws_port=ws_port,
                        )
                    )
                )
                if peer == "minimal":
                    command = [sys.executable, "-m", "bench.minimal_relay", "--config", str(conf)]
                    cwd = ROOT
                else:
                    twistd = str(Path(sys.executable).parent / "twistd")
                    command = [twistd, "-n", "--pidfile=", "tlsproxy", "--config", str(conf)]
                    cwd = self.workdir
            else:
                command = [
                    sys.executable,
                    "-m",
                    "bench.twisted_proxy",
                    "--port",
                    str(port),
                    "--backend-port",
                    str(backend_port),
                    "--combined",
                    str(self.pki.combined),
                ]
                cwd = ROOT
            self.log(f"starting {peer} on port {port}")
            cpus = None if peer in MULTI_WORKER_PEERS else proxy_cpu
            self.servers[peer] = group.start(peer, command, port=port, cpus=cpus, cwd=cwd)

    # -- measurements -------------------------------------------------------------------

    def _measured(
        self, peer: str, kind: str, action: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        server = self.servers[peer]
        if not server.alive():
            self.problems.append(f"{peer}: not running (skipped {kind})")
            return None
        cpu_before, t0 = server.cpu_seconds(), time.monotonic()
        try:
            result = action()
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
            self.problems.append(f"{peer}: {kind} failed: {str(exc).strip()[:300]}")
            self.log(f"{peer}: {kind} failed: {str(exc).strip()[:300]}")
            return None
        elapsed = time.monotonic() - t0
        result["cpu_pct"] = 100 * (server.cpu_seconds() - cpu_before) / elapsed if elapsed else 0.0
        self.raw[peer][kind].append(result)
        return result

    def keepalive(self, peer: str) -> None:
        s = self.settings
        if s.warmup > 0:
            self._warm(peer)
        r = self._measured(
            peer,
            "keepalive",
            lambda: measure.run_wrk(
                port=self.ports[peer],
                script=self.wrk_script,
                connections=s.connections,
                threads=s.threads,
                duration=s.duration,
                cpus=self.pinning.others,
            ),
        )
        if r:
            errors = sum(r["errors"].values())
            self.log(
                f"{peer}: keep-alive {r['rate']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, CPU {r['cpu_pct']:.0f}%, errors {errors}"
            )

    def _warm(self, peer: str) -> None:
        try:
            measure.run_wrk(
                port=self.ports[peer],
                script=self.wrk_script,
                connections=self.settings.connections,
                threads=self.settings.threads,
                duration=self.settings.warmup,
                cpus=self.pinning.others,
            )
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            self.log(f"{peer}: warm-up failed: {str(exc)[:200]}")

    def handshakes(self, peer: str) -> None:
        self._handshakes(peer, resume=False)

    def resumptions(self, peer: str) -> None:
        if peer not in NO_RESUMPTION_PEERS:
            self._handshakes(peer, resume=True)

    def _handshakes(self, peer: str, *, resume: bool) -> None:
        s = self.settings
        r = self._measured(
            peer,
            "resumption" if resume else "handshake",
            lambda: measure.run_handshakes(
                port=self.ports[peer],
                connections=s.handshake_connections,
                duration=s.duration,
                cpus=self.pinning.others,
                cwd=ROOT,
                resume=resume,
            ),
        )
        if r:
            self.log(
                f"{peer}: {r['rate']:,.0f} {'resumed' if resume else 'full'} handshakes/s, "
                f"CPU {r['cpu_pct']:.0f}%, resumed {r['resumed']} of {r['handshakes']}, "
                f"errors {sum(r['errors'].values())}"
            )

    def websockets(self, peer: str) -> None:
        if peer in NO_WEBSOCKET_PEERS:
            return
        s = self.settings
        r = self._measured(
            peer,
            "websocket",
            lambda: measure.run_websocket(
                port=self.ports[peer],
                connections=s.handshake_connections,
                duration=s.duration,
                cpus=self.pinning.others,
                cwd=ROOT,
            ),
        )
        if r:
            self.log(
                f"{peer}: {r['rate']:,.0f} WebSocket messages/s, p99 {r['p99_ms']:.2f} ms, "
                f"CPU {r['cpu_pct']:.0f}%, errors {sum(r['errors'].values())}"
            )

    def bulk(self, peer: str, direction: str) -> None:
        upload = self.upload if direction == "upload" else None
        r = self._measured(
            peer,
            direction,
            lambda: measure.run_bulk(
                port=self.ports[peer],
                upload=upload,
                size=configs.BIG_SIZE,
                repetitions=self.settings.bulk_repetitions,
                cpus=self.pinning.others,
            ),
        )
        if r:
            self.log(f"{peer}: {direction} {r['mb_per_s']:,.0f} MB/s, CPU {r['cpu_pct']:.0f}%")

    def measure_all(self) -> None:
        for peer in self.peers:
            self.tls[peer] = {
                "tls13": measure.tls_check(self.ports[peer]),
                "tls12": measure.tls_check(self.ports[peer], tls12=True),
            }
            self.metrics[peer]["idle_rss_mib"] = self.servers[peer].rss_kib() / 1024
            self.log(f"{peer}: TLS {self.tls[peer]}")
        order = list(self.peers)
        for round_no in range(self.settings.rounds):
            self.log(f"round {round_no + 1} of {self.settings.rounds}: order {', '.join(order)}")
            for peer in order:
                self.keepalive(peer)
            full = [p for p in order if p not in KEEPALIVE_ONLY_PEERS]
            for step in (self.handshakes, self.resumptions, self.websockets):
                for peer in full:
                    step(peer)
            for direction in ("download", "upload"):
                for peer in full:
                    self.bulk(peer, direction)
            order = order[1:] + order[:1]

    def record_peaks(self) -> None:
        """Peak RSS of every peer over the whole run (call last)."""
        for peer in self.peers:
            self.metrics[peer]["peak_rss_mib"] = self.servers[peer].peak_rss_kib() / 1024

    def aggregate(self) -> None:
        for peer in self.peers:
            self.problems += report.aggregate(peer, self.raw[peer], self.metrics[peer])

    # -- profiling -------------------------------------------------------------------

    def soak(self, peer: str, seconds: float) -> None:
        """Keep-alive load on ``peer`` for ``seconds`` while sampling its RSS once a second."""
        server = self.servers[peer]
        self.log(f"{peer}: {seconds:g} s keep-alive soak, sampling RSS")
        command = measure.wrk_command(
            port=self.ports[peer],
            script=self.wrk_script,
            connections=self.settings.connections,
            threads=self.settings.threads,
            duration=seconds,
        )
        samples = [server.rss_kib()]
        wrk = subprocess.Popen(
            pinned(command, self.pinning.others),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + seconds + 30
        try:
            while wrk.poll() is None and time.monotonic() < deadline:
                time.sleep(1.0)
                samples.append(server.rss_kib())
        finally:
            if wrk.poll() is None:
                wrk.kill()
            output = wrk.communicate(timeout=10)[0]
        samples.append(server.rss_kib())
        try:
            rate = measure.parse_wrk(output)["rate"]
        except ValueError as exc:
            self.problems.append(f"{peer}: soak failed: {str(exc)[:300]}")
            return
        first, last = samples[1] if len(samples) > 2 else samples[0], samples[-1]
        m = self.metrics[peer]
        m["soak_seconds"] = seconds
        m["soak_rps"] = rate
        m["soak_rss_mib_start"] = first / 1024
        m["soak_rss_mib_end"] = last / 1024
        m["soak_rss_change_pct"] = 100 * abs(last - first) / first if first else None
        self.raw[peer]["soak_rss_kib"] = samples
        self.log(f"{peer}: soak {rate:,.0f} req/s; RSS {first / 1024:.1f} → {last / 1024:.1f} MiB")

    def profile_tlsproxy(self) -> None:
        """py-spy profiles of tlsproxy under the keep-alive load, then under the
        handshake load; summaries in `profile_text`, raw stacks in ``--out``."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(py_spy, os.X_OK):
            self.problems.append(
                "py-spy is not installed: no profile (bench/run --profile installs it)"
            )
            return
        s = self.settings
        loads: dict[str, Callable[[], object]] = {
            "keepalive": lambda: measure.run_wrk(
                port=self.ports["tlsproxy"],
                script=self.wrk_script,
                connections=s.connections,
                threads=s.threads,
                duration=s.duration + 1,
                cpus=self.pinning.others,
            ),
            "handshake": lambda: measure.run_handshakes(
                port=self.ports["tlsproxy"],
                connections=s.handshake_connections,
                duration=s.duration + 1,
                cpus=self.pinning.others,
                cwd=ROOT,
            ),
        }
        texts = []
        for name, load in loads.items():
            summary = self._profile_under(py_spy, name, load)
            if summary:
                texts.append(f"[{name} load] {summary}")
        self.profile_text = "\n".join(texts)

    def _profile_under(self, py_spy: str, name: str, load: Callable[[], object]) -> str:
        server = self.servers["tlsproxy"]
        output = self.workdir / f"tlsproxy-{name}.pyspy.txt"
        duration = self.settings.duration
        self.log(f"profiling tlsproxy with py-spy for {duration:g} s under the {name} load")
        spy = subprocess.Popen(
            pinned_py_spy(py_spy, server.proc.pid, output, duration, self.pinning.others),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            load()
            _, err = spy.communicate(timeout=duration + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=10)
        if not output.exists():
            self.problems.append(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
            return ""
        self.ns.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(output, self.ns.out / f"latest-tlsproxy-{name}.pyspy.txt")
        return profile.render(profile.summarize_file(output))

    # -- results -----------------------------------------------------------------------

    def results(self, command: str) -> dict[str, Any]:
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command,
                "machine": machine_description(),
                "pinning": self.pinning.describe(),
                "mode": self.settings.mode,
                "settings": self.settings.describe(),
                "versions": versions(),
            },
            "peers": self.peers,
            "metrics": self.metrics,
            "targets": report.check_targets(self.metrics) if "tlsproxy" in self.peers else [],
            "tls": self.tls,
            "raw": self.raw,
            "problems": self.problems,
            "profile": self.profile_text,
        }


def pinned_py_spy(
    py_spy: str, pid: int, output: Path, duration: float, cpus: str | None
) -> list[str]:
    return pinned(profile.py_spy_command(py_spy, pid, output, duration), cpus)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark tlsproxy side by side with nginx, HAProxy, a minimal relay and "
        "stock twisted.web.proxy on 127.0.0.1 (see README.md, Performance).",
    )
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="full",
        help="short: 1 round of 4 s runs, under 2 minutes; full (default): 5 rounds of "
        "8 s runs, about 18 minutes",
    )
    parser.add_argument(
        "--short", dest="mode", action="store_const", const="short", help="same as --mode short"
    )
    parser.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"comma-separated subset of {','.join(ALL_PEERS)} (nginx is the reference for ratios)",
    )
    parser.add_argument("--duration", type=float, help="seconds per rate measurement (override)")
    parser.add_argument("--rounds", type=int, help="number of rounds (override)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk warm-up (override)")
    parser.add_argument("--bulk-repetitions", type=int, help="transfers per direction and round")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile tlsproxy with py-spy under the keep-alive and the handshake load",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory for the JSON and Markdown results",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the run directory (configs, logs)"
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="after the rounds, keep-alive load on tlsproxy for SECONDS while sampling its "
        "RSS (issue 7: flat within 10 %% over 60 s)",
    )
    ns = parser.parse_args(argv)
    peers = [p.strip() for p in ns.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown or not peers:
        parser.error(
            f"--peers: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_PEERS)}"
        )
    ns.peers = [p for p in ALL_PEERS if p in peers]
    if ns.duration is not None and not 0 < ns.duration <= 120:
        parser.error("--duration must be in (0, 120] seconds")
    if not 0 <= ns.soak <= 600:
        parser.error("--soak must be 0 to 600 seconds")
    if ns.rounds is not None and not 1 <= ns.rounds <= 10:
        parser.error("--rounds must be 1 to 10")
    return ns


def settings_for(ns: argparse.Namespace) -> Settings:
    s = MODES[ns.mode]
    changes: dict[str, Any] = {}
    if ns.duration is not None:
        changes["duration"] = ns.duration
    if ns.rounds is not None:
        changes["rounds"] = ns.rounds
    if ns.warmup is not None:
        changes["warmup"] = ns.warmup
    if ns.bulk_repetitions is not None:
        changes["bulk_repetitions"] = ns.bulk_repetitions
    return attrs.evolve(s, **changes)


def missing_tools(peers: list[str]) -> list[str]:
    needed = ["nginx", "wrk", "curl", "openssl"]
    if "haproxy" in peers:
        needed.append("haproxy")
    missing = [t for t in needed if shutil.which(t) is None]
    if not configs.ECHO_MODULE.exists():
        missing.append(f"nginx's echo module ({configs.ECHO_MODULE})")
    return missing


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    settings = settings_for(ns)
    missing = missing_tools(ns.peers)
    if missing:
        print(
            f"bench: missing tools: {', '.join(missing)} (bench/run installs them)", file=sys.stderr
        )
        return 2
    command = os.environ.get("BENCH_COMMAND") or "python -m bench " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    os.chmod(workdir, 0o755)
    run = Run(ns, settings, workdir)
    started = time.monotonic()
    load_at_start = load_average()
    if load_at_start > 0.5:
        run.log(
            f"the machine is busy (load average {load_at_start:.2f}): absolute figures will be "
            "low and noisy; ratios in this run still compare like with like"
        )
    try:
        with ProcessGroup(workdir) as group:
            run.log(f"run directory {workdir}; {run.pinning.describe()}")
            run.prepare_files()
            run.start_servers(group)
            run.measure_all()
            if ns.soak and "tlsproxy" in ns.peers:
                run.soak("tlsproxy", ns.soak)
            if ns.profile and "tlsproxy" in ns.peers:
                run.profile_tlsproxy()
            run.record_peaks()
    except KeyboardInterrupt:
        print("bench: interrupted; all servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    run.aggregate()
    results = run.results(command)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["load_average"] = {"start": load_at_start, "end": load_average()}
    stem = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{settings.mode}"
    json_path, md_path = report.write_results(results, ns.out, stem)
    print()
    print(report.render_text(results))
    if run.profile_text:
        print()
        print(run.profile_text)
    for problem in run.problems:
        print(f"problem: {problem}")
    print(f"\nresults: {json_path}\n         {md_path}\n(took {results['meta']['seconds']} s)")
    return 1 if run.problems else 0
