"""Sphinx configuration of the flaxdcn documentation.

Build (from the repository root, with the ``docs`` extra installed)::

  sphinx-build -W --keep-going -b html docs docs/_build/html

Everything is built offline: no intersphinx inventories and no notebook execution are fetched or
run at build time. The code blocks of the pages run as tests (``tests/test_docs.py``), the
docstrings' examples too (``tests/test_doctests.py``).
"""

import ast
import inspect
import os
import sys
import textwrap

import flax.linen
import flax.nnx

import flaxdcn

sys.path.insert(0, os.path.abspath("_ext"))

project = "flaxdcn"
author = "The flaxdcn authors"
copyright = "2026, The flaxdcn authors"  # pylint: disable=redefined-builtin
release = flaxdcn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "coverage_check",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build", "api/_autosummary/*.md", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# API reference: one generated page per public name (flat, as optax's docs/api/*.rst).
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MyST: ```{directive} fences, $math$, and heading anchors for links between pages.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_title = f"flaxdcn {release}"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


def _annotation(annotation) -> str:
  """An annotation as written in the source (every flaxdcn module uses postponed annotations,
  so these are strings such as ``"Dtype | None"``: flax.typing's aliases stay readable)."""
  if isinstance(annotation, str):
    return annotation
  return inspect.formatannotation(annotation)


def _source_defaults(obj) -> dict[str, str]:
  """The default values of a function's parameters, or of a linen dataclass's fields (its own
  and its flaxdcn base classes'), as written in the source: ``jnp.float32``, not ``<class ...>``."""
  defaults: dict[str, str] = {}
  for owner in (reversed(obj.__mro__) if inspect.isclass(obj) else (obj,)):
    if not getattr(owner, "__module__", "").startswith("flaxdcn"):
      continue
    tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
    node = tree.body[0]
    if isinstance(node, ast.ClassDef):
      for item in node.body:
        if isinstance(item, ast.AnnAssign) and item.value is not None:
          defaults[item.target.id] = ast.unparse(item.value)
    else:
      args = node.args
      positional = args.posonlyargs + args.args
      for arg, value in zip(positional[len(positional) - len(args.defaults):], args.defaults):
        defaults[arg.arg] = ast.unparse(value)
      for arg, value in zip(args.kwonlyargs, args.kw_defaults):
        if value is not None:
          defaults[arg.arg] = ast.unparse(value)
  return defaults


def _format_signature(sig: inspect.Signature, drop: tuple[str, ...],
                      defaults: dict[str, str]) -> tuple[str, str | None]:
  parts, star_done = [], False
  for param in sig.parameters.values():
    if param.name in drop:
      continue
    if param.kind is param.KEYWORD_ONLY and not star_done:
      parts.append("*")
      star_done = True
    prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
    star_done |= param.kind is param.VAR_POSITIONAL
    text = prefix + param.name
    if param.annotation is not param.empty:
      text += f": {_annotation(param.annotation)}"
    if param.default is not param.empty:
      text += (" = " if param.annotation is not param.empty else "=")
      text += defaults.get(param.name, repr(param.default))
    parts.append(text)
  returns = (None if sig.return_annotation is sig.empty
             else _annotation(sig.return_annotation))
  return f"({', '.join(parts)})", returns


def _process_signature(app, what, name, obj, options, signature, return_annotation):
  """Signatures of flaxdcn's functions and modules with their annotations as written.

  NNX modules are documented by their ``__init__`` (``nnx.Module``'s metaclass otherwise shows
  ``(*args, **kwargs)``); linen modules by their dataclass fields, without flax's ``parent`` and
  ``name``.
  """
  if not name.startswith("flaxdcn.") or what not in ("class", "function", "method"):
    return None
  drop: tuple[str, ...] = ()
  target = source = obj
  if what == "class":
    if issubclass(obj, flax.linen.Module):
      drop = ("parent", "name")
    else:
      init = next(c.__init__ for c in obj.__mro__ if "__init__" in vars(c))
      target = source = init
      drop = ("self",)
  elif what == "method":
    drop = ("self",)
  try:
    sig = inspect.signature(target)
    defaults = _source_defaults(source)
  except (TypeError, ValueError, OSError):
    return None
  args, returns = _format_signature(sig, drop, defaults)
  return args, None if what == "class" else returns


def setup(app):
  app.connect("autodoc-process-signature", _process_signature)
