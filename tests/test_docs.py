"""The code blocks of the documentation run, and the performance page's tables are consistent.

Every fenced block marked ``python`` in ``docs/**/*.md`` and ``README.md`` runs, page by page in
one namespace per page (so a block may use the names of the blocks above it): as a doctest when
it starts with ``>>>`` (its output must match), as a script otherwise. Illustrative code that
cannot run here (it needs a checkpoint file or torch) is written in a ``{code-block} python``
directive, which is not run. The docstrings' examples are tested by ``tests/test_doctests.py``;
the Sphinx build (``.ci/run``) checks the rest of the site.
"""

import doctest
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FENCE = re.compile(r"^(`{3,})(.*)$")


def _pages() -> list[pathlib.Path]:
  pages = [p for p in sorted(DOCS.rglob("*.md"))
           if not {"_build", "_autosummary"} & set(p.relative_to(DOCS).parts)]
  return pages + [ROOT / "README.md"]


def code_blocks(text: str) -> list[tuple[str, int, str]]:
  """``(info string, first line number, code)`` of every top-level fenced block of ``text``."""
  blocks, lines, index = [], text.splitlines(), 0
  while index < len(lines):
    match = FENCE.match(lines[index])
    if not match:
      index += 1
      continue
    ticks, info = match.group(1), match.group(2).strip()
    end = index + 1
    while end < len(lines) and lines[end].rstrip() != ticks:
      end += 1
    blocks.append((info, index + 2, "\n".join(lines[index + 1:end]) + "\n"))
    index = end + 1
  return blocks


PAGES = [p for p in _pages() if any(info == "python" for info, _, _ in
                                    code_blocks(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page):
  name = str(page.relative_to(ROOT))
  namespace = {"__name__": "__docs__"}
  for info, line, code in code_blocks(page.read_text(encoding="utf-8")):
    if info != "python":
      continue
    where = f"{name}:{line}"
    if code.lstrip().startswith(">>>"):
      test = doctest.DocTestParser().get_doctest(code, namespace, where, str(page), line - 1)
      test.globs = namespace  # DocTest copies the globals; the page's blocks share one namespace.
      output = []
      result = doctest.DocTestRunner(optionflags=OPTIONS).run(
          test, out=output.append, clear_globs=False)
      assert result.failed == 0, f"{where}\n" + "".join(output)
    else:
      exec(compile(code, where, "exec"), namespace)  # pylint: disable=exec-used


def test_code_blocks_are_found():
  """The parser sees the pages' blocks: the README's linen example and the getting-started
  page's doctests are collected (a broken fence would otherwise test nothing)."""
  assert ROOT / "README.md" in PAGES
  assert DOCS / "getting_started.md" in PAGES
  blocks = code_blocks("text\n```python\n>>> 1 + 1\n2\n```\n```bash\nls\n```\n")
  assert blocks == [("python", 3, ">>> 1 + 1\n2\n"), ("bash", 7, "ls\n")]


def _plot_module():
  spec = importlib.util.spec_from_file_location("plot_performance",
                                                DOCS / "plot_performance.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _close(ratio: float, expected: float) -> bool:
  # The tables give times and ratios rounded to 2-3 digits; the ratios come from unrounded times.
  return abs(ratio - expected) <= 0.03 * expected + 0.01


def test_performance_tables_are_consistent():
  """Every ``x base`` and ``x peer`` in the performance tables is its row's time over the time of
  its baseline (or torchvision's) row of the same shape and pass, within rounding."""
  tables = _plot_module().read_tables((DOCS / "performance.md").read_text(encoding="utf-8"))
  assert set(tables) == {"perf-quiet", "perf-loaded", "perf-dcnv3", "perf-msda"}

  for key in ("perf-quiet", "perf-dcnv3", "perf-msda"):
    base = None
    for row in tables[key]:
      if row["impl"] not in ("ffi", "xla"):
        base = row
        assert row["x base fwd"] == row["x base fwd+bwd"] == "1.00", row
        continue
      for which in ("fwd", "fwd+bwd"):
        expected = float(row[f"{which} ms"]) / float(base[f"{which} ms"])
        assert _close(float(row[f"x base {which}"]), expected), (key, row, which, expected)

  rows = tables["perf-loaded"]
  by_key = {(r["shape"], r["op"], r["impl"], r["pass"]): r for r in rows}
  peers = {"deform_conv2d": "deform_conv2d", "deform_roi_pool": "roi_align"}
  checked = 0
  for row in rows:
    if row["base"] and row["impl"] in ("ffi", "xla"):
      base = next(r for r in rows if (r["shape"], r["op"], r["pass"]) ==
                  (row["shape"], row["base"], row["pass"]))
      assert _close(float(row["x base"]), float(row["ms"]) / float(base["ms"])), row
      checked += 1
    if row["x peer"]:
      peer = by_key[(row["shape"], peers[row["op"]], "torchvision", row["pass"])]
      assert _close(float(row["x peer"]), float(row["ms"]) / float(peer["ms"])), row
      checked += 1
  assert checked == 32


def test_performance_plot_draws(tmp_path):
  pytest.importorskip("matplotlib")
  module = _plot_module()
  tables = module.read_tables((DOCS / "performance.md").read_text(encoding="utf-8"))
  baseline, peer = module.ratios(tables)
  assert len(baseline) == 10 and len(peer) == 6
  out = tmp_path / "ratios.png"
  module.plot(tables, out)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
