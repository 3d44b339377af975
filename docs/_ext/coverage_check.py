"""Fails the build when a public name of flaxdcn is missing from the API reference.

The public names are those of ``flaxdcn``, ``flaxdcn.nnx`` and ``flaxdcn.convert``: a module's
``__all__`` where it defines one; else every function or class whose name does not start with an
underscore and that is defined in the flaxdcn package (for a package such as ``flaxdcn``, whose
namespace is made of re-exports) or in the module itself (for a plain module such as
``flaxdcn.convert``, whose imports are not its API). Submodules, third-party names and type
aliases are not API entries. After Sphinx has read every page, each such name must be
a documented object of the Python domain under that exact path (``flaxdcn.nnx.DeformConv``,
not ``flaxdcn.nnx.conv.DeformConv``); every missing one is reported as a warning, which
``sphinx-build -W`` turns into a failed build.

The optax documentation's ``docs/ext/coverage_check.py`` is the model; this one runs inside the
HTML build instead of as a builder of its own, so one ``sphinx-build`` checks both.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

#: The modules whose public names the API reference must cover.
MODULES = ("flaxdcn", "flaxdcn.nnx", "flaxdcn.convert")

logger = logging.getLogger(__name__)


def public_names(module_name: str) -> list[str]:
  """The fully qualified public names of ``module_name`` (see the module docstring)."""
  module = importlib.import_module(module_name)
  if hasattr(module, "__all__"):
    names: Iterable[str] = module.__all__
  else:
    is_package = hasattr(module, "__path__")
    names = [
        name for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and (value.__module__.split(".")[0] == "flaxdcn" if is_package
             else value.__module__ == module_name)
    ]
  return sorted(f"{module_name}.{name}" for name in names)


def missing_names(documented: Iterable[str]) -> list[str]:
  """The public names of :data:`MODULES` that are not in ``documented``."""
  documented = set(documented)
  return [name for module in MODULES for name in public_names(module) if name not in documented]


def _check(app: Sphinx, env: BuildEnvironment) -> None:
  documented = env.get_domain("py").objects
  for name in missing_names(documented):
    logger.warning(
        "public name %s is not in the API reference: add it to the autosummary list of "
        "docs/api/%s.rst", name, {"flaxdcn": "flaxdcn", "flaxdcn.nnx": "nnx",
                                  "flaxdcn.convert": "convert"}[name.rsplit(".", 1)[0]],
        type="flaxdcn", subtype="api_coverage")


def setup(app: Sphinx) -> dict[str, Any]:
  app.connect("env-check-consistency", _check)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
