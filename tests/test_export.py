"""train.export: a fresh process, without this project's code, reloads the exported model
and computes the logits evaluation computes, at any batch size."""
import functools
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import export
from train.checkpoint import load_run
from train.steps import infer

ROOT = Path(__file__).resolve().parents[1]

# Reloads an export and writes its logits for the images in a .npy file; imports neither
# densenet_jax nor train.
RELOAD_JAX = """
import sys, jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([np.asarray(exported.call(images[:5])),
                                     np.asarray(exported.call(images[5:]))]))
assert "densenet_jax" not in sys.modules and "train" not in sys.modules
"""
RELOAD_SAVEDMODEL = """
import sys, numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([serve(images=tf.constant(images[:5]))["logits"].numpy(),
                                     serve(images=tf.constant(images[5:]))["logits"].numpy()]))
"""


def evaluation_logits(workdir, images: np.ndarray) -> np.ndarray:
    run, state, _, _ = load_run(workdir)
    f = jax.jit(functools.partial(infer, model=run.model, resize=run.train.resize))
    return np.asarray(f(state.variables, images))


@pytest.mark.slow
@pytest.mark.parametrize("form, out, script", [("jax", "model.jax", RELOAD_JAX),
                                               ("savedmodel", "saved", RELOAD_SAVEDMODEL)])
def test_a_fresh_process_gets_the_same_logits(trained, splits, tmp_path, form, out, script):
    images = splits["test"].images[:8]
    np.save(tmp_path / "images.npy", images)
    # As users run it, and so that TensorFlow's runtime (savedmodel) stays out of the test
    # process, whose later JAX compilations it can crash.
    exported = subprocess.run([sys.executable, "-m", "train.export", "--workdir", str(trained),
                               "--out", str(tmp_path / out), "--format", form],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.startswith(f"exported {trained} as {form} to ")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / out),
                           str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"),
                               evaluation_logits(trained, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--out", "/nowhere/model.jax"], "--out /nowhere/model.jax: folder /nowhere does not exist"),
    (["--out", "model.jax", "--workdir", "/"], "/ holds no readable training run"),
])
def test_bad_export_requests_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert export.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
