"""Data parallelism: a step sharded over 4 devices equals the one-device step, two
processes joined by jax.distributed (CPU collectives over 127.0.0.1) train alike, and a
run whose peers never join or stop mid-run ends in one line per process.
Each run is a fresh process: the device count and jax.distributed are fixed at start-up."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from train.parallel import initialize_distributed

pytestmark = pytest.mark.slow  # subprocesses, one per run

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")


def cpu_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def distributed_env(n_devices: int, port: int, process_id: int) -> dict:
    return {**cpu_devices(n_devices), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(processes: list[subprocess.Popen]) -> list[str]:
    """Wait for all; their stdout; fail with the stderr of the first that failed."""
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, f"exit {p.returncode}:\n{err[-4000:]}"
    return [out for out, _ in outputs]


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def worker_results(tmp_path: Path, name: str, envs: list[dict], *args: str) -> list[dict]:
    outs = [tmp_path / f"{name}{i}.npz" for i in range(len(envs))]
    finish([start([str(WORKER), str(out), *args], env) for out, env in zip(outs, envs)])
    return [dict(np.load(out)) for out in outs]


def assert_same_training(a: dict, b: dict) -> None:
    """Parameters, statistics and metrics equal within float64 reduction-order noise. Conv
    biases feed training-mode BatchNorms, so their gradients are exactly zero and their
    values after SGD are rounding noise around 0: those are checked for being ~0."""
    names = [k for k in a if k.startswith("[")]
    assert names and set(names) == {k for k in b if k.startswith("[")}
    for name in names:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        if "['conv']['bias']" in name or name.endswith("['stem_conv']['bias']"):
            assert np.abs(x).max() < 1e-12 and np.abs(y).max() < 1e-12, name
        elif "count" in name or "correct" in name:
            assert np.array_equal(x, y), name
        else:
            error = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
            assert error < 1e-9, f"{name}: relative difference {error:.2e}"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return worker_results(tmp_path_factory.mktemp("one"), "one", [cpu_devices(1)])[0]


def test_sharded_step_equals_single_device_step(one_device, tmp_path):
    [four] = worker_results(tmp_path, "four", [cpu_devices(4)])
    assert int(one_device["mesh_size"]) == 1 and not one_device["all_reduce"]
    assert int(four["mesh_size"]) == 4 and four["all_reduce"]  # really split over 4
    assert_same_training(four, one_device)


def test_reference_kernels_train_alike(one_device, tmp_path):
    """The default (xla_cpu) kernels against the reference kernels over the same steps,
    compiled without YNNPACK's fusions (whose absence once let XLA:CPU round a max pool's
    input differently in its forward and backward passes)."""
    [reference] = worker_results(tmp_path, "reference", [cpu_devices(1)], "--kernels",
                                 "reference")
    assert_same_training(reference, one_device)


def test_two_processes_train_alike(one_device, tmp_path):
    port = free_port()
    first, second = worker_results(tmp_path, "proc", [distributed_env(2, port, i) for i in (0, 1)])
    assert int(first["processes"]) == 2 and int(first["mesh_size"]) == 4 and first["all_reduce"]
    for name in first:  # both processes hold the same replicated state, bit for bit
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert_same_training(first, one_device)


def test_two_process_cli_run(data_dir, tmp_path):
    port = free_port()
    args = ["-m", "train.main", "--data-dir", str(data_dir), "--workdir", str(tmp_path),
            "--resize", "32", "--limit-train", "512", "--batch-size", "128", "--epochs", "1",
            *TINY]
    lead, other = finish([start(args, distributed_env(1, port, i)) for i in (0, 1)])
    assert lead.strip().splitlines()[-1].endswith("examples/sec on 2 × cpu (cpu), 2 processes")
    assert "epoch" not in other and "examples/sec" not in other  # process 0 alone reports
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS='localhost' is not host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two"},
     "JAX_NUM_PROCESSES='two' is not a non-negative integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:99999"}, r"is not host:port \(port 1..65535"),
    ({"JAX_COORDINATOR_ADDRESS": "http://10.0.0.1:1234"}, r"is not host:port .*no scheme"),
    ({"JAX_COORDINATOR_ADDRESS": "no-such-host.invalid:1234"},
     "host 'no-such-host.invalid' is unknown"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "DENSENET_JAX_JOIN_TIMEOUT": "soon"},
     "DENSENET_JAX_JOIN_TIMEOUT='soon' must be a positive number of seconds"),
])
def test_bad_distributed_environment_is_named(env, message):
    with pytest.raises(ValueError, match=message) as error:
        initialize_distributed(env, log=lambda *args, **kwargs: None)
    assert "\n" not in str(error.value)
    assert initialize_distributed({}) is False


def test_a_coordinator_port_in_use_is_one_line():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}: port "
                           rf"{port} is in use here \(Address already in use\), by another "
                           rf"program or another run; choose a free port"):
            initialize_distributed({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                    "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
                                   log=lambda *args, **kwargs: None)


def test_a_coordinator_that_never_comes_is_one_line_after_the_timeout(capsys):
    """Process 1 waits for process 0, which never starts: it says so at once, then fails
    in one line after DENSENET_JAX_JOIN_TIMEOUT (JAX itself would abort with a C++ stack)."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1", "DENSENET_JAX_JOIN_TIMEOUT": "2"}
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"no coordinator answered at 127.0.0.1:{port} within "
                                         f"2 s; start process 0"):
        initialize_distributed(env)
    assert 2 <= time.monotonic() - start < 30
    assert capsys.readouterr().out == (f"waiting up to 2 s for 2 processes to join at "
                                       f"127.0.0.1:{port} ($DENSENET_JAX_JOIN_TIMEOUT sets the "
                                       f"wait)\n")


def test_peers_that_never_join_end_in_one_line(data_dir, tmp_path):
    """Process 0 alone: after DENSENET_JAX_JOIN_TIMEOUT, one line and exit 1 (JAX itself
    aborts with a C++ stack); the runtime's log is kept in the workdir."""
    env = {**distributed_env(1, free_port(), 0), "DENSENET_JAX_JOIN_TIMEOUT": "3"}
    done = subprocess.run([sys.executable, "-m", "train.main", "--data-dir", str(data_dir),
                           "--workdir", str(tmp_path), "--resize", "32"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("error: not all 2 processes joined at 127.0.0.1:"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "RegisterTask" in (tmp_path / "runtime-process0.log").read_text()


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def long_run(data_dir, workdir: Path, port: int, process: int) -> tuple[list[str], dict]:
    """Arguments and environment of process `process` of a 50-epoch two-process CLI run of
    the tiny network (stdout unbuffered, to act once an epoch is reported)."""
    return (["-m", "train.main", "--data-dir", str(data_dir), "--workdir", str(workdir),
             "--resize", "32", "--limit-train", "512", "--batch-size", "128", "--epochs", "50",
             *TINY], {**distributed_env(1, port, process), "PYTHONUNBUFFERED": "1"})


def start_long_run(data_dir, workdir: Path) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a `long_run`."""
    port = free_port()
    return [start(*long_run(data_dir, workdir, port, i)) for i in (0, 1)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_peer_killed_mid_run_ends_both_in_one_line_each(data_dir, tmp_path):
    """Process 1's training is killed once epoch 1 is saved: process 0 says at once that it
    lost contact and what is saved (JAX would wait for the heartbeat, then abort), and
    process 1's watcher says what stopped it. Exit 1 both, checkpoints kept."""
    lead, peer = start_long_run(data_dir, tmp_path / "run")
    for line in lead.stdout:
        if line.startswith("epoch 1/50"):
            [training] = children(peer.pid)
            os.kill(training, signal.SIGKILL)
            break
    _, lead_err = lead.communicate(timeout=120)
    _, peer_err = peer.communicate(timeout=120)
    saved = f"epochs up to 1 are saved in {tmp_path / 'run' / 'checkpoints'}"
    assert lead.returncode == 1 and lead_err.count("\n") == 1, lead_err
    assert lead_err.startswith("error: this process lost contact with the others of the run")
    assert lead_err.rstrip().endswith(f"{saved}; start every process again with --resume")
    assert peer.returncode == 1, peer_err
    assert peer_err.strip().splitlines()[-1] == (f"error: the training process was stopped by "
                                                 f"SIGKILL; {saved}")
    assert "Check failure" not in lead_err + peer_err
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_sigterm_ends_a_two_process_run_as_it_ends_one(data_dir, tmp_path):
    """SIGTERM to process 0 (as a scheduler sends it) once epoch 1 is saved: it says how to
    resume, and process 1, left alone, says it lost its peer and what is saved; both stop."""
    lead, peer = start_long_run(data_dir, tmp_path / "run")
    for line in lead.stdout:
        if line.startswith("epoch 1/50"):
            lead.send_signal(signal.SIGTERM)
            break
    _, lead_err = lead.communicate(timeout=120)
    _, peer_err = peer.communicate(timeout=120)
    assert lead.returncode == 130, lead_err
    last = lead_err.strip().splitlines()[-1]
    assert re.fullmatch(rf"interrupted: epochs up to \d+ are saved in {tmp_path / 'run'}/"
                        rf"checkpoints; continue with the same command plus --resume", last)
    assert "preemption" not in lead_err + peer_err
    assert peer.returncode == 1, peer_err
    assert peer_err.strip().splitlines()[-1].startswith(
        "error: this process lost contact with the others of the run")
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_a_process_started_again_on_a_live_run_is_refused_and_the_run_goes_on(data_dir,
                                                                               tmp_path):
    """Process 1's command run a second time while the run lives: it must not join the
    coordinator (JAX's service would take it for process 1 restarted and stop the run)."""
    port = free_port()
    lead, peer = [start(*long_run(data_dir, tmp_path / "run", port, i)) for i in (0, 1)]
    for line in lead.stdout:
        if line.startswith("epoch 1/50"):
            break
    args, env = long_run(data_dir, tmp_path / "run", port, 1)
    again = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    going_on = next(line for line in lead.stdout if line.startswith("epoch "))
    lead.send_signal(signal.SIGTERM)
    lead.communicate(timeout=120)
    peer.communicate(timeout=120)
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: {tmp_path / 'run'} is in use by another training "
                                   f"run (process "), again.stderr
    assert again.stderr.count("\n") == 1
    assert going_on and lead.returncode == 130  # ended by the SIGTERM, not by a lost peer

