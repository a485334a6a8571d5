"""Where tlsproxy spends its time under the keep-alive load: py-spy samples, summarized.

One job: summarize py-spy's ``--format raw`` output (collapsed stacks: one
line per distinct stack, ``frame;frame;...;leaf COUNT``) into the functions
with the most samples on top of the stack (self time) and anywhere in it
(inclusive time).  `py_spy_command` builds the recording command; the
benchmark runs it while wrk loads tlsproxy.

Pure module apart from reading the file it is given.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path

import attrs


@attrs.frozen
class Summary:
    total: int
    #: (frame, samples) with the most self samples first.
    self_time: list[tuple[str, int]]
    #: (frame, samples) with the most inclusive samples first, leaving out frames
    #: on more than 90 % of all stacks (twistd's and the reactor's outer loop).
    inclusive: list[tuple[str, int]]


def py_spy_command(py_spy: str, pid: int, output: Path, duration: float) -> list[str]:
    return [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(output),
    ]


def _short(frame: str) -> str:
    # py-spy frames look like "function (path/to/module.py:123)"; keep the module's tail.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    tail = "/".join(path.split("/")[-2:]) if path else where
    return f"{name} ({tail})" if tail else name


def summarize(lines: Iterable[str], top: int = 20) -> Summary:
    """The ``top`` frames by self and by inclusive samples (line numbers dropped)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    # Frames on (nearly) every stack are the reactor's outer loop: they say nothing.
    informative = [(f, n) for f, n in incl_counts.most_common() if n <= 0.9 * total]
    return Summary(
        total=total,
        self_time=self_counts.most_common(top),
        inclusive=informative[:top],
    )


def render(summary: Summary) -> str:
    def block(title: str, rows: list[tuple[str, int]]) -> list[str]:
        out = [title]
        for frame, count in rows:
            share = 100 * count / summary.total if summary.total else 0
            out.append(f"  {share:5.1f}%  {frame}")
        return out

    lines = [f"py-spy: {summary.total} samples of tlsproxy under the keep-alive load"]
    lines += block("self time (top of stack):", summary.self_time)
    lines += block("inclusive time:", summary.inclusive)
    return "\n".join(lines)


def summarize_file(path: Path, top: int = 20) -> Summary:
    with open(path, encoding="utf-8", errors="replace") as f:
        return summarize(f, top)
