"""Polling files for changes (the certificate file watch)."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock

from tlsproxy.watch import FileWatch


def test_a_replaced_or_removed_file_triggers_one_callback_per_change(tmp_path: Path) -> None:
    """Rewriting a watched file (even keeping its size and mtime, by renaming a new one over
    it) or removing it calls back once; an unchanged file never does."""
    cert = tmp_path / "site.pem"
    cert.write_text("one")
    calls: list[int] = []
    clock = Clock()
    watch = FileWatch(lambda: [str(cert)], lambda: calls.append(1), clock, 5)
    watch.start()
    clock.advance(5)
    clock.advance(5)
    assert calls == []

    new = tmp_path / "site.pem.new"
    new.write_text("two")
    stat = cert.stat()
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new.replace(cert)  # same size and mtime, new inode: certbot's rename
    clock.advance(5)
    assert calls == [1]
    clock.advance(5)
    assert calls == [1]

    cert.unlink()
    clock.advance(5)
    assert calls == [1, 1]
    watch.stop()
    cert.write_text("three")
    clock.advance(50)
    assert calls == [1, 1]


def test_the_set_of_paths_is_asked_again_after_a_change(tmp_path: Path) -> None:
    """After a change (a reload may name other files), the new set of files is watched."""
    first, second = tmp_path / "a.pem", tmp_path / "b.pem"
    first.write_text("a")
    second.write_text("b")
    watched = [str(first)]
    calls: list[int] = []

    def changed() -> None:
        calls.append(1)
        watched[:] = [str(second)]

    clock = Clock()
    watch = FileWatch(lambda: list(watched), changed, clock, 1)
    watch.start()
    first.write_text("a changed")
    clock.advance(1)
    assert calls == [1]
    first.write_text("no longer watched")
    clock.advance(1)
    assert calls == [1]
    second.write_text("b changed")
    clock.advance(1)
    assert calls == [1, 1]


def test_a_change_made_while_the_callback_runs_is_seen_next_time(tmp_path: Path) -> None:
    """If the key is replaced while the reload for a new certificate is running, another
    reload follows, so both new files are eventually read together."""
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    cert.write_text("cert one")
    key.write_text("key one")
    calls: list[int] = []

    def changed() -> None:
        calls.append(1)
        if len(calls) == 1:
            key.write_text("key two, written during the reload")

    clock = Clock()
    watch = FileWatch(lambda: [str(cert), str(key)], changed, clock, 1)
    watch.start()
    cert.write_text("cert two")
    clock.advance(1)
    assert calls == [1]
    clock.advance(1)
    assert calls == [1, 1]
    clock.advance(1)
    assert calls == [1, 1]
