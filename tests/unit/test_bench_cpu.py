"""The benchmark's CPU per request by process: which role each of a server's processes plays, what each
role spent between two readings of /proc, and the report's table of it."""

import os
import subprocess
import sys

import pytest

from bench import cpu
from bench.report import _analysis, _cpu
from bench.run import Report


@pytest.mark.parametrize(
    ("title", "name", "role"),
    [
        ("ray::ServeReplica:multimodel:ModelWorker", "ray::ServeRepli", cpu.WORKERS),
        ("ray::ServeReplica:multimodel:ModelWorker.predict", "ray::ServeRepli", cpu.WORKERS),  # a method running
        ("ray::ServeReplica:other-app:Ingress", "ray::ServeRepli", cpu.INGRESS),
        ("/usr/sbin/haproxy -f /tmp/haproxy.cfg -db", "haproxy", cpu.HAPROXY),
        ("ray::HAProxyManager", "ray::HAProxyMan", cpu.HAPROXY),
        ("ray::ServeController.listen_for_change", "ray::ServeContr", cpu.CONTROLLER),
        ("ray::ServeReplica:floor:Echo", "ray::ServeRepli", cpu.REST),  # another deployment's replica
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node", "raylet", cpu.REST),
    ],
)
def test_each_process_of_the_app_has_the_role_its_title_says(title, name, role):
    assert cpu.role(title, name) == role


def test_a_reading_finds_each_process_below_the_root_with_its_role_and_cpu_time():
    burn = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('burnt', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "burnt\n"  # it has used its 0.3 s of CPU
        reading = cpu.snapshot(os.getpid(), "this test")
    finally:
        child.kill()
        child.wait()
    (key,) = [key for key in reading if key[0] == child.pid]
    assert reading[key][0] == cpu.REST and reading[key][1] >= 0.25
    assert [role for (pid, _), (role, _) in reading.items() if pid == os.getpid()] == ["this test"]


def test_what_each_role_spent_between_two_readings():
    before = {(10, 1): (cpu.WORKERS, 5.0), (11, 1): (cpu.INGRESS, 2.0), (12, 1): (cpu.REST, 1.0)}
    after = {
        (10, 1): (cpu.WORKERS, 7.5),  # the same process: its time since the first reading
        (11, 1): (cpu.INGRESS, 2.5),
        (13, 9): (cpu.WORKERS, 0.5),  # started since: all of its time
        (12, 9): (cpu.REST, 0.25),  # PID 12 used again by a new process: not the old one's time subtracted
    }
    assert cpu.spent(before, after) == {cpu.WORKERS: 3.0, cpu.INGRESS: 0.5, cpu.REST: 0.25}
    assert cpu.spent(after, after) == {cpu.WORKERS: 0.0, cpu.INGRESS: 0.0, cpu.REST: 0.0}


def point(rps: float, per_role: dict[str, float], cpus: float) -> dict:
    return {"rps": rps, "cpu_ms_per_request": 0.05, "server_cpu_ms_per_request": per_role, "server_cpus": cpus}


def test_the_report_shows_each_servers_cpu_per_request_by_role_at_16_clients_and_what_the_target_needs():
    # in the order /proc lists the processes, not the table's
    app = {cpu.REST: 0.2, cpu.CONTROLLER: 0.1, cpu.HAPROXY: 0.2, cpu.INGRESS: 1.5, cpu.WORKERS: 4.0}
    r = Report(
        machine={"cpus": 2},
        throughput={
            "app": {
                "one model": {"4": point(100.0, {cpu.WORKERS: 9.0}, 1.0), "16": point(300.0, app, 1.8)},
                "two hot models": {"16": point(280.0, app, 1.9)},
            },
            "seed": {"one model": {"16": point(150.0, {cpu.ONE_PROCESS: 12.0}, 1.8)}},
        },
    )
    table = "\n".join(_cpu(r))
    assert "at 16 clients" in table and "| process | app, one model | app, two hot models | seed-style server" in table
    assert f"| {cpu.WORKERS} | 4.00 | 4.00 |  |" in table and f"| {cpu.ONE_PROCESS} |  |  | 12.00 |" in table
    assert "| all | 6.00 | 6.00 | 12.00 |" in table
    (line,) = [line for line in _analysis(r) if "CPU per request at 16 clients" in line]
    # 2.2 x 150 req/s at 6 ms a request: 1.98 CPUs
    assert "the app 6.00 ms (worker replicas 4.00, ingress replica 1.50, HAProxy" in line  # in the table's order
    assert "1.98 CPUs" in line and "the seed-style server 12.00 ms" in line
    assert _cpu(Report(throughput={"app": {"one model": {"16": {"rps": 1.0}}}})) == []  # not measured: no table
