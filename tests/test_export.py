"""train.export: a fresh process, without this project's code, reloads the exported model
and computes the logits evaluation computes, at any batch size."""
import functools
import json
import re
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
# Runs `python -m train.export ARGS...` as after README's install without extras: the
# modules of every package the project does not require cannot be imported.
AS_IF_ONLY_DECLARED = """
import json, runpy, sys
for name in json.loads(sys.argv.pop(1)):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
runpy.run_module("train.export", run_name="__main__", alter_sys=True)
"""
RELOAD_SAVEDMODEL = """
import sys, numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures[sys.argv[4]]
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([serve(images=tf.constant(images[:5]))["logits"].numpy(),
                                     serve(images=tf.constant(images[5:]))["logits"].numpy()]))
"""


def undeclared_modules() -> list[str]:
    """The top-level modules installed here that only packages the project does not require
    (pyproject's dependencies, and what they require in turn, extras left out) provide."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared, todo = {canonicalize_name(project["name"])}, list(project["dependencies"])
    while todo:
        requirement = Requirement(todo.pop())
        name = canonicalize_name(requirement.name)
        if name not in declared and not (requirement.marker
                                         and not requirement.marker.evaluate({"extra": ""})):
            declared.add(name)
            todo += importlib.metadata.requires(name) or []
    return sorted(module for module, providers in importlib.metadata.packages_distributions().items()
                  if not {canonicalize_name(p) for p in providers} & declared)


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
    # process, whose later JAX compilations it can crash; --format jax with only what a
    # plain install brings.
    launch = (["-m", "train.export"] if form == "savedmodel" else
              ["-c", AS_IF_ONLY_DECLARED, json.dumps(undeclared_modules())])
    exported = subprocess.run([sys.executable, *launch, "--workdir", str(trained),
                               "--out", str(tmp_path / out), "--format", form],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.startswith(f"exported {trained} as {form} to ")
    signature = re.search(r"whose `(\w+)` signature", export.__doc__)[1]  # as --help says
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / out),
                           str(tmp_path / "images.npy"), str(tmp_path / "logits.npy"), signature],
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

