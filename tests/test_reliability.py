"""Nothing lost, nothing cryptic: reused workdirs, damaged checkpoints, signals, file-system
mistakes, divergence, out of memory, and what a newcomer sees."""
import json
import logging
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from train import main as cli
from train.loop import diverged

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--resize", "32", "--limit-train", "300", "--batch-size", "100", *TINY)


def run_cli(data_dir, workdir, *args):
    return cli.main(["--data-dir", str(data_dir), "--workdir", str(workdir), *QUICK, *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def two_epochs(data_dir, tmp_path_factory):
    """A finished two-epoch run's workdir, copied by each test that changes it."""
    workdir = tmp_path_factory.mktemp("two_epochs")
    assert run_cli(data_dir, workdir, "--epochs", "2") == 0
    return workdir


def copy_run(source: Path, tmp_path: Path) -> Path:
    subprocess.run(["cp", "-a", str(source), str(tmp_path / "run")], check=True)
    return tmp_path / "run"


@pytest.mark.slow
def test_a_used_workdir_is_refused_without_resume_or_overwrite(data_dir, two_epochs, tmp_path,
                                                                capsys):
    workdir = copy_run(two_epochs, tmp_path)
    before = (workdir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_cli(data_dir, workdir, "--epochs", "1", "--lr", "0.05") == 1
    err = one_error_line(capsys)
    assert "already holds a run (checkpoints up to epoch 2); continue it with --resume" in err
    assert (workdir / "metrics.jsonl").read_text() == before  # nothing touched

    old_events = set(workdir.glob("events.out.tfevents.*"))
    assert run_cli(data_dir, workdir, "--epochs", "1", "--lr", "0.05", "--overwrite") == 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    assert old_events and not old_events & set(workdir.glob("events.out.tfevents.*"))
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["recipe"]["learning_rate"] == 0.05
    assert saved["data"]["download"] is False  # --data-dir: nothing is downloaded


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_compiles_nothing(data_dir, two_epochs, tmp_path,
                                                              capsys, compilations):
    workdir = copy_run(two_epochs, tmp_path)
    capsys.readouterr()
    assert run_cli(data_dir, workdir, "--epochs", "2", "--resume") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("input: ")  # which input path, then
    assert lines[2] == (f"nothing to train: {workdir} already holds all 2 epochs of this run "
                        f"(python -m train.evaluate --workdir {workdir} measures it)")
    assert len(lines) == 5 and lines[3].startswith("loss ")  # then d2l's closing lines
    assert not {"train_step", "eval_step", "init_variables"} & set(compilations())

    assert run_cli(data_dir, workdir, "--epochs", "1", "--resume") == 1
    assert (f"--resume with --epochs 1: this run already holds 2 epochs (in "
            f"{workdir.absolute()}/checkpoints); resume with --epochs 2 or more") \
        in one_error_line(capsys)


def rewrite_state(checkpoint: Path) -> None:
    """Checkpoint `checkpoint`'s arrays written again, valid, with one weight changed: what
    damage that still decodes looks like."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(checkpoint / "state")
        leaves, treedef = jax.tree.flatten(tree)
        biggest = max(range(len(leaves)), key=lambda i: np.size(leaves[i]))
        leaves[biggest] = np.asarray(leaves[biggest]).copy()
        leaves[biggest].flat[0] += 1
        shutil.rmtree(checkpoint / "state")
        checkpointer.save((checkpoint / "state").absolute(), jax.tree.unflatten(treedef, leaves))


def flip_a_bit(checkpoint: Path) -> None:
    """One bit flipped in the middle of the largest file of `checkpoint`'s arrays."""
    largest = max((p for p in (checkpoint / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10
    largest.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete", "garble_meta", "flip_a_bit",
                                    "rewrite_state"])
def test_resume_skips_a_damaged_latest_checkpoint(data_dir, two_epochs, tmp_path, capfd, caplog,
                                                  damage):
    workdir = copy_run(two_epochs, tmp_path)
    latest = workdir / "checkpoints" / "2"
    files = sorted(p for p in latest.rglob("*") if p.is_file())
    if damage == "truncate":
        for path in files:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "delete":
        for path in files:
            if "state" in path.parts:
                path.unlink()
    elif damage == "garble_meta":
        (latest / "meta" / "metadata").write_text("{not json")
    else:
        {"flip_a_bit": flip_a_bit, "rewrite_state": rewrite_state}[damage](latest)
    capfd.readouterr()
    assert run_cli(data_dir, workdir, "--epochs", "2", "--resume") == 0
    out = capfd.readouterr()
    assert out.err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # orbax's own log
    skipped = [line for line in out.out.splitlines() if line.startswith("skipped checkpoint 2")]
    assert len(skipped) == 1 and skipped[0].endswith(f"moved to {workdir}/damaged_checkpoints/2")
    assert "resumed from epoch 1" in out.out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_is_one_line(data_dir, two_epochs, tmp_path, capfd):
    workdir = copy_run(two_epochs, tmp_path)
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    capfd.readouterr()
    assert run_cli(data_dir, workdir, "--epochs", "2", "--resume") == 1
    err = one_error_line(capfd)
    assert f"no checkpoint in {workdir.absolute()}/checkpoints restores" in err
    # Starting again is now possible, and the damaged ones are kept aside.
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_evaluating_a_checkpoint_whose_arrays_changed_is_one_line(two_epochs, tmp_path):
    from train.checkpoint import CheckpointError, load_run
    workdir = copy_run(two_epochs, tmp_path)
    rewrite_state(workdir / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match=r"checkpoint .*/2 does not restore "
                       r"\(DamagedCheckpointError: its arrays are not the ones saved"):
        load_run(workdir)
    assert load_run(workdir, epoch=1)[2] == 1


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train.evaluate", "train.export"])
def test_tools_on_a_damaged_checkpoint_say_so_in_one_line(two_epochs, tmp_path, tool):
    """As users run them: orbax's reads left in flight end after the error, at exit."""
    workdir = copy_run(two_epochs, tmp_path)
    for data in (workdir / "checkpoints" / "2" / "state").glob("ocdbt.process_*/d"):
        shutil.rmtree(data)
    done = subprocess.run([sys.executable, "-m", tool, "--workdir", str(workdir), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: checkpoint {workdir.absolute()}/checkpoints/2 does "
                                  f"not restore (")
    assert done.stderr.endswith("; pass --epoch 1 for the one before\n")
    assert done.stderr.count("\n") == 1, done.stderr[:3000]


def test_only_orbax_s_late_callbacks_go_unprinted(capsys, monkeypatch):
    from train.checkpoint import ignore_late_callbacks

    class Failing:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    ignore_late_callbacks()
    Failing(RuntimeError("Event loop is closed"))
    assert capsys.readouterr().err == ""
    Failing(ValueError("a real problem"))
    assert "ValueError: a real problem" in capsys.readouterr().err
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line(data_dir, tmp_path):
    """Files may grow to 12 kB only (RLIMIT_FSIZE), less than the tiny network's arrays: each
    write past it fails (EFBIG) as on a full disk, deep in orbax's writer threads."""
    limited = ("import resource, runpy\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))\n"
               "runpy.run_module('train.main', run_name='__main__', alter_sys=True)")
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", limited, "--data-dir", str(data_dir), "--workdir", str(workdir),
         *QUICK, "--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: could not save epoch 1's checkpoint in "
                                  f"{workdir}/checkpoints (")
    assert done.stderr.endswith("); no epoch is saved yet; make room or fix the folder, then "
                                "start again\n")
    assert done.stderr.count("\n") == 1, done.stderr[:3000]
    assert list((workdir / "checkpoints").iterdir()) == []  # the partial one removed


def test_a_run_file_that_cannot_be_written_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    from train import outputs

    write_metrics = outputs.write_metrics

    def full(workdir, history):  # the disk fills up after epoch 1's checkpoint
        if history:
            raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))
        write_metrics(workdir, history)

    monkeypatch.setattr(outputs, "write_metrics", full)
    assert run_cli(data_dir, tmp_path, "--epochs", "2") == 1
    assert one_error_line(capsys) == (
        f"error: cannot write {tmp_path / 'metrics.jsonl'} (No space left on device); epochs "
        f"up to 1 are saved in {tmp_path / 'checkpoints'}; make room or fix the folder, then "
        f"continue with --resume\n")


def test_a_workdir_in_use_by_a_run_is_refused(data_dir, tmp_path, capsys):
    # Another process holds it, as a trainer does for its whole run.
    code = ("import sys, time; from pathlib import Path; from train.checkpoint import hold\n"
            "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        assert run_cli(data_dir, tmp_path, "--epochs", "1") == 1
    finally:
        other.kill()
        other.wait()
    assert (f"error: {tmp_path} is in use by another training run (process {other.pid}); "
            f"wait for it to end, or choose another --workdir") in one_error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_a_killed_run_leaves_its_workdir_free(tmp_path):
    from train.checkpoint import hold
    code = ("import os, sys; from pathlib import Path; from train.checkpoint import hold\n"
            "with hold(Path(sys.argv[1])): os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT).returncode == -9
    with hold(tmp_path):
        pass


def test_resume_of_a_missing_workdir_creates_nothing(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path / "absent", "--resume") == 1
    assert (f"--resume: {tmp_path / 'absent'} does not exist; point --workdir at the run to "
            f"continue, or start without --resume") in one_error_line(capsys)
    assert not (tmp_path / "absent").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_before_anything_is_built(
        data_dir, two_epochs, tmp_path, capsys, monkeypatch, compilations):
    workdir = copy_run(two_epochs, tmp_path)
    monkeypatch.setattr(cli.data, "load", lambda *args, **kwargs: pytest.fail("data loaded"))
    capsys.readouterr()
    assert run_cli(data_dir, workdir, "--epochs", "2", "--batch-size", "50", "--resume") == 1
    assert (f"--resume: the run in {workdir} is of another configuration (train.batch_size "
            f"was 100, now 50); rerun with the same settings") in one_error_line(capsys)
    assert not compilations()


@pytest.mark.slow
@pytest.mark.parametrize("keep, kept", [([], ["2", "3"]), (["--keep", "0"], ["1", "2", "3"]),
                                        (["--keep", "1"], ["3"])])
def test_keep_says_how_many_epochs_checkpoints_stay(data_dir, tmp_path, keep, kept):
    assert run_cli(data_dir, tmp_path, "--epochs", "3", *keep) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == kept


def test_the_divergence_rule():
    assert diverged(float("nan"), 10) and diverged(float("inf"), 10)
    assert diverged(4.8e35, 10) and diverged(23.1, 10)  # 10 · ln 10 = 23.03
    assert not diverged(2.31, 10) and not diverged(22.9, 10)


@pytest.mark.slow
def test_a_huge_lr_stops_as_diverged(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "--epochs", "2", "--lr", "1e6") == 1
    err = one_error_line(capsys)
    assert "in epoch 1, training stopped; no epoch completed, so nothing was saved; " \
           "training diverged: lower --lr" in err


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**70)], "--seed must be in 0..4294967295, got 1180591620717411303424"),
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--keep", "-1"], "--keep must be 0 (every epoch) or positive, got -1"),
])
def test_more_bad_arguments(data_dir, tmp_path, capsys, args, message):
    assert run_cli(data_dir, tmp_path, *args) == 1
    assert message in one_error_line(capsys)


@pytest.mark.slow
def test_a_second_run_loads_its_programs_from_the_compilation_cache(data_dir, tmp_path):
    """--compilation-cache: the first process compiles and keeps its steps, a second one
    with the same network and recipe (another workdir and seed) loads them."""
    def run(name, *args):
        return subprocess.run(
            [sys.executable, "-m", "train.main", "--data-dir", str(data_dir), "--workdir",
             str(tmp_path / name), *QUICK, "--epochs", "1", "--compilation-cache",
             str(tmp_path / "cache"), *args],
            cwd=ROOT, env={**os.environ, "JAX_LOG_COMPILES": "1"}, capture_output=True,
            text=True, timeout=300)

    first = run("first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Persistent compilation cache hit" not in first.stderr
    assert any((tmp_path / "cache").iterdir())
    second = run("second", "--seed", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    hits = re.findall(r"Persistent compilation cache hit for '(\w+)'", second.stderr)
    assert sorted(name for name in hits if name.endswith("_step")) == [
        "jit_eval_step", "jit_train_step"]  # 300 examples: one batch shape of each
    assert "jit_init_variables" in hits


@pytest.mark.parametrize("where", ["a_file", "below_a_file"])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(data_dir, tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("")
    workdir = tmp_path / "a_file" / ("" if where == "a_file" else "run")
    assert run_cli(data_dir, workdir) == 1
    err = one_error_line(capsys)
    assert str(workdir) in err and "choose another --workdir" in err


def test_a_compilation_cache_that_cannot_be_a_folder_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert run_cli(data_dir, tmp_path / "run", "--compilation-cache", str(tmp_path / "a_file")) == 1
    assert (f"--compilation-cache {tmp_path / 'a_file'} is a file, not a folder; choose another "
            f"--compilation-cache") in one_error_line(capsys)


def test_out_of_memory_names_the_flags(data_dir, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "107374182400 bytes.\nmore lines of XLA's status")

    monkeypatch.setattr(cli, "fit", exhausted)
    assert run_cli(data_dir, tmp_path, "--batch-size", "100000") == 1
    err = one_error_line(capsys)
    assert "out of memory at --batch-size 100000, --resize 32; lower them" in err


def test_interrupted_before_any_epoch_says_so(data_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "fit", interrupted)
    assert run_cli(data_dir, tmp_path) == 130
    assert capsys.readouterr().err.strip() == ("interrupted before any epoch was saved; start "
                                               "again with the same command")


@pytest.mark.slow
def test_sigterm_saves_the_last_epoch_and_says_how_to_resume(data_dir, tmp_path):
    """A scheduler's SIGTERM, sent once epoch 1 is saved: the run ends as with Ctrl-C."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "train.main", "--data-dir", str(data_dir), "--workdir",
         str(workdir), *QUICK, "--epochs", "50"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/50"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: epochs up to ") and last.endswith(
        "continue with the same command plus --resume")
    saved = int(last.split("epochs up to ")[1].split()[0])
    assert saved >= 1 and (workdir / "checkpoints" / str(saved)).is_dir()


# `python -m train.main ARGS...` that sends itself SIGNAL DELAY seconds after epoch 2's
# checkpoint begins to be written, while orbax's writers are busy.
SIGNAL_DURING_SAVE = """
import os, runpy, signal, sys, threading
import orbax.checkpoint as ocp
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background
which, delay = getattr(signal, sys.argv.pop(1)), float(sys.argv.pop(1))  # job ignores it
save = ocp.CheckpointManager.save

def save_and_signal(self, step, *args, **kwargs):
    if step == 2:
        threading.Timer(delay, os.kill, (os.getpid(), which)).start()
    return save(self, step, *args, **kwargs)

ocp.CheckpointManager.save = save_and_signal
runpy.run_module("train.main", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_checkpoint_save_is_one_line(data_dir, tmp_path, which):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_SAVE, which, "0.05", "--data-dir", str(data_dir),
         "--workdir", str(workdir), *QUICK, "--epochs", "3"], cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 130
    last = done.stderr.strip()
    assert re.fullmatch(rf"interrupted: epochs up to [12] are saved in {workdir}/checkpoints; "
                        rf"continue with the same command plus --resume", last), done.stderr[:3000]


@pytest.mark.slow
def test_start_up_says_what_it_is_doing(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "--epochs", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "loading Fashion-MNIST (idx)"
    assert lines[1].startswith("input: 7.7 MiB of images, held on the devices (the device "
                               "limit: ")  # run_cli's training and test splits
    assert lines[2] == "compiling the train and eval steps"
    assert re.fullmatch(r"compiled in \d+\.\d s; the train step takes \d+ MiB per device",
                        lines[3]), lines[3]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_plot_shows_one_epoch_and_labels_its_axes():
    from train.plots import curves_figure

    fig = curves_figure([{"epoch": 1, "loss": 0.9, "train_acc": 0.7, "test_acc": 0.65}])
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy")
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "epoch"
    lines = loss_ax.get_lines() + acc_ax.get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "train acc", "test acc"]
    assert all(line.get_marker() not in (None, "None", "") for line in lines)  # one point shows
    with_validation = curves_figure([{"epoch": 1, "loss": 0.9, "train_acc": 0.7,
                                      "test_acc": 0.65, "val_acc": 0.66}])
    assert [line.get_label() for line in with_validation.axes[1].get_lines()] == [
        "train acc", "test acc", "val acc"]
    fig.canvas.draw()
    ticks = [t for t in acc_ax.get_xticks() if acc_ax.get_xlim()[0] <= t <= acc_ax.get_xlim()[1]]
    assert ticks == [1.0]  # whole epochs only


def test_help_shows_defaults_and_suggests_resize_32(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "add --resize 32" in text and "(default: 256)" in text and "(default: 96, d2l's" in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("module, usage", [("train.main", "usage: python -m train.main"),
                                           ("train.bench", "usage: python -m train.bench")])
def test_the_commands_run_as_readme_calls_them(module, usage, tmp_path):
    """`python -m MODULE` reaches main(): help on stdout; a bad value ends in one line, exit 2."""
    helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith(usage), helped.stderr
    refused = subprocess.run([sys.executable, "-m", module, "--batch", "x"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"python -m {module}: error: argument --batch")
