"""What the tests and the benchmark use to leave no process behind (serve_app/devtools.py)."""

import shutil
import socket
import subprocess
import sys

from serve_app.devtools import FREE_PORTS, free_port, haproxy_processes, no_haproxy_left


def test_the_haproxy_processes_this_session_started_are_found_below_it_and_stopped(tmp_path):
    """A stand-in named haproxy, started by a child of this process (as Ray's HAProxyManager actor starts
    the real one), is found under this process and under that child; no_haproxy_left, around a shutdown, stops it."""
    fake = tmp_path / "haproxy"
    fake.symlink_to(shutil.which("sleep"))
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, time; subprocess.Popen([{str(fake)!r}, '60']); time.sleep(60)"]
    )
    try:
        found: list[int] = []
        for _ in range(100):
            found = haproxy_processes()
            if found:
                break
            subprocess.run(["sleep", "0.05"])
        assert len(found) == 1 and haproxy_processes(parent.pid) == found
        with no_haproxy_left():  # as the test sessions and the benchmark wrap their shutdown
            # one more started during the shutdown (as Serve's graceful reload of HAProxy starts one)
            later = subprocess.Popen([str(fake), "60"])
        assert haproxy_processes() == []  # gone (or a zombie its parent has not reaped: ended all the same)
        assert later.wait(timeout=10) is not None
    finally:
        parent.kill()
        parent.wait()


def test_free_ports_are_distinct_bindable_and_outside_the_kernels_ephemeral_range():
    """Outgoing connections and Ray's own port-0 binds draw from the ephemeral range: a port picked there
    can be taken before the server it is for binds it."""
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all(port in FREE_PORTS for port in ports)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert FREE_PORTS.stop <= int(f.read().split()[0])
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))
