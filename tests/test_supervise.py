"""train.supervise: a multi-process run's failures end in one line, never a C++ abort."""
import signal

import pytest

from train import supervise

# What JAX's runtime wrote when a peer of process 0 was killed mid-run (shortened).
ABORT = b"""\
E1130 20:09:05.774150   23732 coordination_service.cc:1520] [71] Shutdown barrier in coordination service has failed:
INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout.
This suggests that the workers are out of sync.
F1130 20:09:05.774627   23743 client.h:80] Terminating process because the JAX distributed service detected fatal errors.

RPC: /xla.coordination.CoordinationService/PollForError
*** Check failure stack trace: ***
    @     0x7f69fac40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""
JOIN = b"""\
F1130 20:05:12.948389   23605 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
*** Check failure stack trace: ***
"""
ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
       "DENSENET_JAX_JOIN_TIMEOUT": "30"}


def split(text: bytes) -> tuple[bytes, bytes]:
    shown = []
    kept = supervise.split_runtime_lines(text.splitlines(keepends=True), shown.append)
    return b"".join(shown), b"".join(kept)


def test_the_runtime_log_is_kept_back_and_ours_passes():
    ours = b"epoch 1/6: loss 1.240\n"
    info = b"I1130 20:05:07.100000   23605 service.cc:12] listening\n"
    python_warning = b"W1130 20:05:07.100000 140 checkpoint_manager.py:12] slow save\n"
    error = b"error: this process lost contact with the others of the run\n"
    shown, kept = split(ours + info + python_warning + ABORT + error)
    assert shown == ours + python_warning + error
    assert kept == info + ABORT


@pytest.mark.parametrize("runtime, returncode, said, expected", [
    (JOIN, -signal.SIGABRT, False, "error: not all 2 processes joined at 10.0.0.1:1234 within "
                                   "30 s; start every one (JAX_PROCESS_ID 0 to 1)"),
    (ABORT, -signal.SIGABRT, False, "error: this process lost contact with the others of the "
                                    "run at 10.0.0.1:1234"),
    (b"", -signal.SIGKILL, False, "error: the training process was stopped by SIGKILL"),
    (ABORT, -signal.SIGABRT, True, None),  # it said why before the runtime aborted it
    (b"", 0, False, None),
    (b"", 130, False, None),
])
def test_an_end_by_a_signal_is_one_line(runtime, returncode, said, expected):
    message = supervise.ending(returncode, runtime.splitlines(keepends=True), said, ENV,
                               saved="epochs up to 3 are saved in runs/x/checkpoints")
    if expected is None:
        assert message is None
        return
    assert message.startswith(expected) and "\n" not in message
    if runtime is ABORT:
        assert "epochs up to 3 are saved" in message and message.endswith("with --resume")


def test_only_an_unwatched_multi_process_run_is_watched():
    assert supervise.wanted({"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert not supervise.wanted({"JAX_COORDINATOR_ADDRESS": "h:1", supervise.CHILD_VAR: "1"})
    assert not supervise.wanted({})
