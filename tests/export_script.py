"""Runs the ``jax.export`` artifacts that tests/test_export.py wrote, in a fresh process.

Usage::

  python -I tests/export_script.py DIR portable
  python -I tests/export_script.py DIR native

``DIR/manifest.json`` lists the artifacts: ``{"portable": [name, ...], "native": [name, ...]}``.
For each ``name``, ``DIR/<name>.bin`` is ``Exported.serialize(vjp_order=1)`` and
``DIR/<name>.npz`` holds the flattened arguments ``arg0, arg1, ...`` and the flattened output
cotangent ``cot0, ...``. Running an artifact means deserialising it, calling it and pulling the
cotangent back through its serialised VJP; ``DIR/<mode>/<name>.npz`` gets the results ``out0, ...``
and the argument gradients ``grad0, ...``.

``portable``: flaxdcn cannot be imported (a meta-path finder refuses it before anything else is
imported; the script checks that ``import flaxdcn`` fails, and at the end that no flaxdcn module
was loaded). Runs every portable artifact, and calls every native one, which must fail:
``DIR/portable/native_errors.json`` maps each native artifact to its error message.

``native``: imports flaxdcn (which registers its FFI targets with jax) and runs every native
artifact.

Only jax and numpy are used to run the artifacts.
"""

import importlib.abc
import json
import pathlib
import sys


class _Refuse(importlib.abc.MetaPathFinder):
  """Makes ``flaxdcn`` and its submodules unimportable, installed or not."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname == "flaxdcn" or fullname.startswith("flaxdcn."):
      raise ModuleNotFoundError(f"No module named {fullname!r} (refused by {__file__})",
                                name=fullname)
    return None


def _run(directory: pathlib.Path, name: str, out: pathlib.Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  exported = jax.export.deserialize(bytearray((directory / f"{name}.bin").read_bytes()))
  with np.load(directory / f"{name}.npz") as data:
    args = [data[f"arg{i}"] for i in range(exported.in_tree.num_leaves)]
    cot = [data[f"cot{i}"] for i in range(exported.out_tree.num_leaves)]
  args, kwargs = jax.tree.unflatten(exported.in_tree, args)

  def forward_and_vjp(args, cot):  # one compilation: the forward, then the serialised VJP
    outputs, vjp = jax.vjp(lambda *a: exported.call(*a, **kwargs), *args)
    return outputs, vjp(cot)

  outputs, grads = jax.jit(forward_and_vjp)(args, jax.tree.unflatten(exported.out_tree, cot))
  arrays = {f"out{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(outputs))}
  arrays |= {f"grad{i}": np.asarray(g) for i, g in enumerate(jax.tree.leaves(grads))}
  np.savez(out / f"{name}.npz", **arrays)


def main() -> None:
  directory, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
  manifest = json.loads((directory / "manifest.json").read_text())
  out = directory / mode
  out.mkdir()
  if mode == "portable":
    sys.meta_path.insert(0, _Refuse())
    try:
      import flaxdcn  # pylint: disable=import-outside-toplevel,unused-import
    except ModuleNotFoundError:
      pass
    else:
      raise AssertionError("flaxdcn was importable in the process that must run without it")
    for name in manifest["portable"]:
      _run(directory, name, out)
    errors = {}
    for name in manifest["native"]:
      try:
        _run(directory, name, out)
      except Exception as e:  # pylint: disable=broad-exception-caught
        errors[name] = f"{type(e).__name__}: {e}"
      else:
        errors[name] = None
    (out / "native_errors.json").write_text(json.dumps(errors))
    loaded = sorted(m for m in sys.modules if m == "flaxdcn" or m.startswith("flaxdcn."))
    if loaded:
      raise AssertionError(f"flaxdcn modules were loaded: {loaded}")
  elif mode == "native":
    import flaxdcn  # pylint: disable=import-outside-toplevel,unused-import
    for name in manifest["native"]:
      _run(directory, name, out)
  else:
    raise SystemExit(f"unknown mode {mode!r}: portable or native")


if __name__ == "__main__":
  main()
