"""Which processes make up a server, and the CPU they have used, read from /proc.

A server is started as the leader of a session of its own, so its processes are those of that
session; BentoML's workers run in sessions of their own, so descendants of the leader count too.
A process's CPU is utime + stime + cutime + cstime: a child that exits and is reaped by another
process of the server moves its time into the parent's cutime/cstime, so totals stay comparable
across a measurement.
What cannot be read: a process that exited and was reaped by a process outside the server (an
orphan reparented to init): its time leaves the total.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/pid/stat (after the command name, which may hold spaces), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether the process still runs (a zombie has exited)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def server_pids(leader: int) -> list[int]:
    """The leader, every process in its session, and every descendant of any of them."""
    parents: dict[int, int] = {}
    pids = {leader}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None:
            continue
        # Field 4 is the parent pid, field 6 the session id (fields[0] is field 3).
        parents[int(entry.name)] = int(fields[1])
        if int(fields[3]) == leader:
            pids.add(int(entry.name))
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in pids} - pids
        pids |= children
        grown = bool(children)
    return sorted(pids)


def cpu_seconds(leader: int) -> float:
    """User + system CPU of the server's processes so far, their reaped children's included."""
    total_ticks = 0
    for pid in server_pids(leader):
        fields = _stat(pid)
        if fields is not None:
            # Fields 14-17: utime, stime, cutime, cstime, in clock ticks.
            total_ticks += sum(int(v) for v in fields[11:15])
    return total_ticks * _TICK_S
