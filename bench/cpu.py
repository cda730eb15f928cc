"""What each part of a server costs a request in CPU: the CPU time of its processes, by role, from /proc.

A server is a process tree: the seed-style server is one process; the app is ``serve run`` and the Ray
instance below it, where Ray titles each actor's process (``ray::ServeReplica:<app>:<deployment>``, with
the method it runs at the moment after a dot) and HAProxy runs as a child of Ray's HAProxy manager actor.
``snapshot`` reads the CPU time (user and system) of the root and every process below it; ``spent`` is
what each role used between two snapshots. Per request, it says where a point's CPU went: the benchmark
measures it on every throughput point (``scenarios.throughput``), and the report shows it at 16 clients.

What it leaves out: a process that ended between the two readings (its time is gone from /proc with it).
What "the rest of Ray" holds besides Ray's own processes: every replica of another deployment or
application in the same instance (the benchmark's Serve floor, the app's registry check), idle then.
"""

from __future__ import annotations

import os

from serve_app.launch import current, descendants, stat_fields

TICK = os.sysconf("SC_CLK_TCK")

WORKERS = "worker replicas"
INGRESS = "ingress replica"
HAPROXY = "HAProxy and its manager"
CONTROLLER = "Serve's controller"
REST = "the rest of Ray"
ONE_PROCESS = "the server's one process"
ROLES = (WORKERS, INGRESS, HAPROXY, CONTROLLER, REST, ONE_PROCESS)
"""The roles, in the order the report lists them: the app's, and a single-process server's."""

REPLICA_TITLE = "ray::ServeReplica:"

Snapshot = dict[tuple[int, int], tuple[str, float]]
"""(PID, start time) -> (role, CPU seconds so far): a PID used again by a new process is a new key."""


def serve_replica(title: str) -> tuple[str, str] | None:
    """The application and deployment of a Serve replica's process, from the title Ray gives it
    (``ray::ServeReplica:<app>:<deployment>``, then ``.<method>`` while it runs one); None for any other."""
    command = title.split(" ", 1)[0]
    if not command.startswith(REPLICA_TITLE):
        return None
    app, sep, deployment = command[len(REPLICA_TITLE) :].rpartition(":")
    return (app, deployment.split(".", 1)[0]) if sep else None


def role(title: str, name: str) -> str:
    """The role of an app's process, from its title (its command line, which Ray sets for its actors) and its
    name (``/proc/PID/stat``)."""
    if name == "haproxy" or title.startswith("ray::HAProxyManager"):
        return HAPROXY
    if title.startswith("ray::ServeController"):
        return CONTROLLER
    _, deployment = serve_replica(title) or (None, None)
    return {"ModelWorker": WORKERS, "Ingress": INGRESS}.get(deployment, REST)


def title(pid: int) -> str | None:
    """A process's title: its command line, which Ray rewrites for its actors (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far, user and system (None once it is gone)."""
    read = stat_fields(pid)
    if read is None:
        return None
    _, fields = read  # utime and stime: fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / TICK


def snapshot(root: int, root_role: str) -> Snapshot:
    """The CPU time so far of ``root`` (as ``root_role``) and of every process below it (by ``role``)."""
    out: Snapshot = {}
    top = current(root)
    for proc in [top, *descendants(root)] if top else []:
        seconds, command = cpu_seconds(proc.pid), title(proc.pid)
        if seconds is not None and command is not None:  # not gone meanwhile
            out[proc.key()] = (root_role if proc is top else role(command, proc.name), seconds)
    return out


def spent(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots: of the processes in ``after``, each one's time since
    ``before`` (all of it for a process started since)."""
    out: dict[str, float] = {}
    for key, (name, cpu) in after.items():
        out[name] = out.get(name, 0.0) + cpu - before.get(key, (name, 0.0))[1]
    return out
