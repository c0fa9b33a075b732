"""research/run_singlenode.sh and run_multinode.sh: arguments, per-rank environment, logs, supervision.

Cheap tests use the original HCCL path (MF_LAUNCH_BACKEND=hccl) with shell commands as ranks. The
MindSpore tests start real 2-rank CPU clusters (dynamic cluster on loopback): a single-node AllReduce,
a killed rank followed by a rerun in the same folder, and two "nodes" on one machine.
Every test marks its processes with a unique environment token and kills whatever still carries it.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESEARCH = os.path.join(ROOT, "research")
SINGLE = os.path.join(RESEARCH, "run_singlenode.sh")
MULTI = os.path.join(RESEARCH, "run_multinode.sh")
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
VENV_BIN = os.path.dirname(sys.executable)


def processes_with(token):
    """Pids of live processes whose environment carries ``token``."""
    found = []
    needle = f"MF_TEST_TOKEN={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat", "rb") as stat:
                        if stat.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                            found.append(int(entry))
        except OSError:
            continue
    return found


class Launches:
    """Starts launchers with a unique token; ``cleanup`` kills anything that still carries it."""

    def __init__(self):
        self.token = uuid.uuid4().hex
        self.procs = []

    def env(self, **extra):
        env = dict(os.environ)
        env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
        env["MF_TEST_TOKEN"] = self.token
        env["GLOG_v"] = "3"
        for key in ("MF_LAUNCH_BACKEND", "DEVICE_TARGET", "MS_SCHED_PORT", "MS_SCHED_HOST", "RANK_TABLE_FILE",
                    "RANK_ID", "RANK_SIZE", "DEVICE_ID", "MS_ROLE", "MF_LAUNCH_SCHEDULER"):
            env.pop(key, None)
        env.update(extra)
        return env

    def start(self, script, args, cwd, **extra):
        proc = subprocess.Popen(["bash", script, *args], cwd=cwd, env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, script, args, cwd, timeout=120, **extra):
        proc = self.start(script, args, cwd, **extra)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
        for pid in processes_with(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def launches():
    box = Launches()
    try:
        yield box
    finally:
        box.cleanup()


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "hccl_2p_01_127.0.0.1.json"
    path.write_text("{}")
    return path


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_no_process_left(token, timeout=5):
    wait_for(lambda: not processes_with(token), timeout, f"processes of token {token} to exit")


# --------------------------------------------------------------------------- arguments (no process)

@pytest.mark.parametrize("args", [[], ["echo"], ["echo", "t.json", "[0,2]"], ["echo", "t.json", "[0,2]", "2", "x"]])
def test_exactly_four_arguments(launches, tmp_path, args, table):
    code, _, err = launches.run(SINGLE, args, tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1
    assert "Usage: bash run_singlenode.sh" in err


@pytest.mark.parametrize("rng", ["[a,2]", "[0,-2]", "[-1,2)", "0,2", "[0;2]", "[,2]"])
def test_range_must_be_two_non_negative_integers(launches, tmp_path, table, rng):
    code, _, err = launches.run(SINGLE, ["true", str(table), rng, "2"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1
    assert "non-negative integers" in err and rng in err


def test_rank_table_must_exist(launches, tmp_path):
    code, _, err = launches.run(SINGLE, ["true", "missing.json", "[0,2]", "2"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1
    assert f"RANK_TABLE_FILE {tmp_path}/missing.json does not exist" in err


def test_counts_are_checked(launches, tmp_path, table):
    code, _, err = launches.run(SINGLE, ["true", str(table), "[0,2]", "4"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1 and "starts 2 rank(s) but RANK_SIZE is 4" in err
    code, _, err = launches.run(MULTI, ["true", str(table), "[2,4]", "3"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1 and "ranks up to 3 but RANK_SIZE is 3" in err
    code, _, err = launches.run(SINGLE, ["true", str(table), "[2,2]", "2"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1 and "starts no rank" in err
    code, _, err = launches.run(SINGLE, ["true", str(table), "[0,2]", "0"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 1 and "RANK_SIZE must be a positive integer" in err


def test_backend_choice(launches, tmp_path, table):
    code, out, _ = launches.run(SINGLE, ["true", table.name, "[0,2]", "2"], tmp_path, DEVICE_TARGET="Ascend")
    assert code == 0 and "backend hccl" in out
    code, _, err = launches.run(SINGLE, ["true", table.name, "[0,2]", "2"], tmp_path, MF_LAUNCH_BACKEND="nccl")
    assert code == 1 and "MF_LAUNCH_BACKEND must be hccl or msrun" in err


# --------------------------------------------------------------------------- hccl path with shell ranks

ECHO = 'echo "R=$RANK_ID D=$DEVICE_ID S=$RANK_SIZE T=$RANK_TABLE_FILE"'


@pytest.mark.parametrize("rng", ["[0,2]", "[0,2)"])
def test_single_node_environment_and_logs(launches, tmp_path, table, rng):
    code, out, err = launches.run(SINGLE, [ECHO, table.name, rng, "2"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 0, err
    for rank in (0, 1):
        log = (tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log").read_text()
        assert log.strip() == f"R={rank} D={rank} S=2 T={table}"   # relative table made absolute
        assert f"start training for rank {rank}, device {rank}" in out


def test_multi_node_environment_and_logs(launches, tmp_path, table):
    code, _, err = launches.run(MULTI, [ECHO, table.name, "[2,4]", "4"], tmp_path, MF_LAUNCH_BACKEND="hccl")
    assert code == 0, err
    for rank, device in ((2, 0), (3, 1)):
        log = (tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log").read_text()
        assert log.strip() == f"R={rank} D={device} S=4 T={table}"
    assert not (tmp_path / "output" / "log" / "rank_0").exists()


def test_failing_rank_stops_the_others(launches, tmp_path, table):
    command = 'if [ "$RANK_ID" = 1 ]; then sleep 1; echo dying; exit 3; fi; sleep 60 & wait'
    start = time.time()
    code, _, err = launches.run(SINGLE, [command, table.name, "[0,2]", "2"], tmp_path, timeout=30,
                                MF_LAUNCH_BACKEND="hccl")
    assert code == 3
    assert time.time() - start < 10
    assert "rank 1 (device 1" in err and "exited with status 3" in err and "dying" in err
    assert_no_process_left(launches.token)


def test_signal_to_launcher_stops_all_ranks(launches, tmp_path, table):
    proc = launches.start(SINGLE, ["sleep 60 & sleep 60; wait", table.name, "[0,2]", "2"], tmp_path,
                          MF_LAUNCH_BACKEND="hccl")
    wait_for(lambda: len(processes_with(launches.token)) >= 5, 10, "ranks to start")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 143
    assert "got SIGTERM, stopping all ranks" in err
    assert_no_process_left(launches.token)


# --------------------------------------------------------------------------- MindSpore CPU clusters

def read_results(folder):
    return {int(f.split("_")[1].split(".")[0]): json.loads((folder / f).read_text())
            for f in os.listdir(folder) if f.startswith("rank_")}


def test_single_node_cpu_cluster_killed_rank_then_rerun(launches, tmp_path, table):
    """A SIGKILLed rank: named, others stopped, non-zero within seconds; then a rerun in place works."""
    pids = tmp_path / "pids"
    proc = launches.start(SINGLE, [f"python {SCRIPTS}/rank_fault.py hold {pids}", table.name, "[0,2]", "2"],
                          tmp_path)
    wait_for(lambda: (pids / "pid_0").exists() and (pids / "pid_1").exists(), 120, "both ranks to initialise")
    time.sleep(0.2)
    victim = int((pids / "pid_1").read_text())
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 137, out + err
    print(f"launcher exited {time.time() - killed_at:.1f} s after the kill")
    assert time.time() - killed_at < 10
    assert f"rank 1 (device 1, pid {victim}) exited with status 137 (killed by signal 9)" in err
    assert_no_process_left(launches.token)

    results = tmp_path / "results"
    code, out, err = launches.run(SINGLE, [f"python {SCRIPTS}/allreduce_check.py {results}", table.name,
                                           "[0,2)", "2"], tmp_path, timeout=180)
    assert code == 0, out + err
    found = read_results(results)
    assert sorted(found) == [0, 1]
    for rank, record in found.items():
        assert record["world"] == 2 and record["sum"] == 1.0
        assert record["env"] == {"RANK_ID": str(rank), "DEVICE_ID": str(rank), "RANK_SIZE": "2",
                                 "RANK_TABLE_FILE": str(table)}
    assert "backend msrun" in out
    assert (tmp_path / "output" / "log" / "rank_1" / "mindformer.log").read_text().count("allreduce sum 1.0") == 1
    assert_no_process_left(launches.token)


def test_two_nodes_on_loopback(launches, tmp_path, table):
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    results = tmp_path / "results"
    command = f"python {SCRIPTS}/allreduce_check.py {results}"
    nodes = [tmp_path / "node1", tmp_path / "node2"]
    for node in nodes:
        node.mkdir()
    second = launches.start(MULTI, [command, str(table), "[1,2]", "2"], nodes[1], MS_SCHED_PORT=port)
    first = launches.start(MULTI, [command, str(table), "[0,1]", "2"], nodes[0], MS_SCHED_PORT=port)
    out1, err1 = first.communicate(timeout=180)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0, out1 + err1
    assert second.returncode == 0, out2 + err2
    assert "started here" in out1 and "on another node" in out2
    found = read_results(results)
    assert sorted(found) == [0, 1]
    assert found[1]["env"]["RANK_ID"] == "1" and found[1]["env"]["DEVICE_ID"] == "0"
    assert all(record["sum"] == 1.0 and record["world"] == 2 for record in found.values())
    assert (nodes[0] / "output" / "log" / "rank_0" / "mindformer.log").exists()
    assert (nodes[1] / "output" / "log" / "rank_1" / "mindformer.log").exists()
    assert_no_process_left(launches.token)
