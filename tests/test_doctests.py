"""The ``Example usage::`` blocks of flaxdcn's docstrings run as doctests, one test per docstring.

Every module of the imported flaxdcn package is collected (the installed package, the one the
other tests use), so importing each module cleanly is tested too.
"""

import doctest
import importlib
import pkgutil

import pytest

import flaxdcn

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules():
  names = [flaxdcn.__name__] + sorted(
      info.name for info in pkgutil.walk_packages(flaxdcn.__path__, flaxdcn.__name__ + "."))
  return [importlib.import_module(name) for name in names]


MODULES = _modules()
DOCTESTS = sorted((test for module in MODULES
                   for test in doctest.DocTestFinder(exclude_empty=True).find(module)
                   if test.examples), key=lambda test: test.name)


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda test: test.name)
def test_docstring_example(test):
  output = []
  runner = doctest.DocTestRunner(optionflags=OPTIONS)
  result = runner.run(test, out=output.append, clear_globs=True)
  assert result.failed == 0, "".join(output)


def test_every_example_block_is_collected():
  """Each docstring with an ``Example usage::`` block yields a doctest (a block without ``>>>``
  lines, or one on an object the finder skips, would silently test nothing)."""
  collected = {test.name for test in DOCTESTS}
  with_block = {test.name for module in MODULES
                for test in doctest.DocTestFinder(exclude_empty=False).find(module)
                if test.docstring and "Example usage::" in test.docstring}
  assert with_block, "no Example usage:: blocks found"
  assert with_block <= collected, sorted(with_block - collected)
  for name in ("flaxdcn.convert.conv_params_from_torch", "flaxdcn.linen.conv.DeformConv",
               "flaxdcn.ops.roi_pool.deform_roi_pool"):
    assert name in collected
