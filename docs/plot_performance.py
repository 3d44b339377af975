"""Draws docs/_static/performance_ratios.png from the tables of docs/performance.md.

The tables are the record; this script only reads them. Each table it uses follows a MyST label
line, ``(perf-quiet)=``, ``(perf-loaded)=`` or ``(perf-dcnv3)=``. Run from anywhere::

  python docs/plot_performance.py [--out PATH]
"""

from __future__ import annotations

import argparse
import pathlib

DOCS = pathlib.Path(__file__).resolve().parent
PAGE = DOCS / "performance.md"
OUT = DOCS / "_static" / "performance_ratios.png"


def read_tables(text: str) -> dict[str, list[dict[str, str]]]:
  """The tables that follow a ``(label)=`` line, as lists of rows keyed by the header cells."""
  tables: dict[str, list[dict[str, str]]] = {}
  lines = text.splitlines()
  for index, line in enumerate(lines):
    if not (line.startswith("(") and line.endswith(")=")):
      continue
    rows = []
    for row in lines[index + 1:]:
      if not row.strip() and not rows:
        continue
      if not row.startswith("|"):
        break
      rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    tables[line[1:-2]] = [dict(zip(header, cells)) for cells in body]
  return tables


def label(row: dict[str, str]) -> str:
  impl = {"ffi": "native", "xla": "jnp"}.get(row["impl"], row["impl"])
  shape = row.get("shape", "V1")
  return f"{row['op']} {impl}" + (f" ({shape})" if shape else "")


def ratios(tables: dict[str, list[dict[str, str]]]):
  """Two lists of ``(label, fwd ratio, fwd+bwd ratio)``: against the baseline (quiet run and the
  DCNv3 run) and against torchvision (loaded run)."""
  baseline = []
  for key in ("perf-quiet", "perf-dcnv3"):
    for row in tables[key]:
      if row["impl"] in ("ffi", "xla"):
        baseline.append((label(row), float(row["x base fwd"]), float(row["x base fwd+bwd"])))
  peer: dict[str, dict[str, float]] = {}
  for row in tables["perf-loaded"]:
    if row["x peer"]:
      peer.setdefault(label(row), {})[row["pass"]] = float(row["x peer"])
  return baseline, [(name, p["fwd"], p["fwd+bwd"]) for name, p in peer.items()]


def plot(tables: dict[str, list[dict[str, str]]], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  baseline, peer = ratios(tables)
  fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), width_ratios=(len(baseline), len(peer)),
                           constrained_layout=True)
  titles = ("time / baseline in the same run (dense conv; 5x5 conv for DK; plain RoI pooling;\n"
            "depthwise conv for DCNv3/v4), CPU float32; R1, P1: quiet 2026-11-21; V1: load 15-21",
            "time / torchvision in the same run\n(CPU float32, 2026-12-01, load 17-22)")
  for ax, data, title in zip(axes, (baseline, peer), titles):
    names = [d[0] for d in data]
    y = np.arange(len(data))
    ax.barh(y - 0.2, [d[1] for d in data], 0.4, label="forward", color="#4c72b0")
    ax.barh(y + 0.2, [d[2] for d in data], 0.4, label="forward+backward", color="#dd8452")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
  axes[0].legend(fontsize=8, loc="lower right")
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args()
  plot(read_tables(PAGE.read_text()), args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
