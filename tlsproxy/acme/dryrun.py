"""``tlsproxy acme-dry-run``: the real service, pointed at a throw-away state directory.

Builds the proxy exactly as ``twistd tlsproxy`` would (listeners, TLS,
port-80 site, ACME service) from the configuration with ``acme.directory``
replaced by the dry-run directory and ``acme.state_dir`` by a temporary
directory, waits until every ``acme: true`` host got a certificate or failed
once, prints the outcome and stops.  Runs its own reactor; the live state
directory is never opened.
"""

from __future__ import annotations

import sys
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner, textFileLogObserver

from tlsproxy.config import Config, HostConfig
from tlsproxy.errors import ConfigError

#: The longest a dry run waits for all hosts, in seconds.
DEADLINE = 600.0


def run(config: Config, hosts: list[HostConfig], directory: str, state: str) -> int:
    """Rehearse issuance for ``hosts``; 0 if every one got a certificate."""
    from tlsproxy.service import build_service

    trial = attrs.evolve(
        config,
        acme=attrs.evolve(config.acme, directory=directory, state_dir=state, retry_initial=3600.0),
        access_log=None,  # a rehearsal writes nothing into the live log
        metrics=None,  # nor binds the live metrics port
    )
    names = {h.name for h in hosts}
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    print(f"ACME dry run against {directory} (state in {state}, discarded)")

    async def main(reactor: Any) -> int:
        try:
            top: Any = build_service(trial, reactor)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem.render(exc.source), file=sys.stderr)
            return 1
        top.privilegedStartService()  # binds the listeners (exits if one is taken)
        top.startService()
        acme = top.runtime.acme
        try:
            deadline = reactor.seconds() + DEADLINE
            while reactor.seconds() < deadline:
                slots = {n: s for n, s in acme.slots.items() if n in names}
                if slots and all(
                    s.status.last_success or s.status.failures for s in slots.values()
                ):
                    break
                await task.deferLater(reactor, 0.5)
        finally:
            await top.stopService()
        status = 0
        for name in sorted(names):
            slot = acme.slots.get(name)
            if slot is not None and slot.status.last_success and not slot.status.failures:
                print(f"{name}: ok, a certificate was issued (and discarded)")
            else:
                error = slot.status.last_error if slot is not None else None
                print(f"{name}: FAILED: {error or 'no answer within the deadline'}")
                status = 1
        return status

    result: list[int] = []

    async def wrapped(reactor: Any) -> None:
        result.append(await main(reactor))

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(wrapped(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return int(exit_.code) if isinstance(exit_.code, int) else 1
    return result[0] if result else 1
