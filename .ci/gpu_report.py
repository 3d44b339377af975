"""The reading half of .ci/gpu-check: counts what pytest, compute-sanitizer and the benchmark left
behind and writes the report. Standard library only, so that it runs wherever the check does.

  python .ci/gpu_report.py collect NODEIDS            # collected tests per op family
  python .ci/gpu_report.py pytest LOG [JUNIT]         # passed / failed / skipped / errors
  python .ci/gpu_report.py sanitizer LOG              # errors in flaxdcn's kernels and elsewhere
  python .ci/gpu_report.py merge-benchmark OUT JSON...  # one benchmark.json of every group's rows
  python .ci/gpu_report.py report WORK OUT            # the summary, summary.json, gpu-table.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

#: Native op families: (name, words of a test id that name the family), the first match wins.
FAMILIES = (
    ("driver", ("test_cuda_driver.py",)),
    ("dcnv4", ("dcnv4",)),
    ("dcnv3", ("dcnv3",)),
    ("ms_deform_attn", ("ms_deform_attn", "msda")),
    ("roi_pool", ("roi",)),
    ("conv", ("im2col", "deform_conv", "torchvision", "conv")),
)
#: The order of the report; the op families every CUDA selection must cover come first.
REPORT_ORDER = ("conv", "roi_pool", "dcnv3", "dcnv4", "ms_deform_attn", "driver", "other")
REQUIRED = ("conv", "roi_pool", "dcnv3", "dcnv4")


def family(nodeid: str) -> str:
  lowered = nodeid.lower()
  for name, words in FAMILIES:
    if any(word in lowered for word in words):
      return name
  return "other"


def read_nodeids(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if "::" in line and not line.startswith(" ")]


def collect_summary(nodeids: list[str]) -> str:
  """Counts per op family and per test function, e.g. ``conv 47: test_ffi.py::test_x 40, ...``."""
  by_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for nodeid in nodeids:
    by_family[family(nodeid)][nodeid.split("[")[0]] += 1
  lines = []
  for name in REPORT_ORDER:
    functions = by_family.get(name)
    if not functions:
      if name in REQUIRED:
        lines.append(f"  {name:15s}   0  (no test)")
      continue
    total = sum(functions.values())
    detail = ", ".join(f"{fn.split('/')[-1]} {n}" for fn, n in sorted(functions.items()))
    lines.append(f"  {name:15s} {total:3d}  {detail}")
  return "\n".join(lines)


# --- pytest --------------------------------------------------------------------------------------

OUTCOMES = ("passed", "failed", "skipped", "errors")


def junit_counts(path: str) -> dict[str, int] | None:
  """Outcome counts from a junit xml, or None if there is none (a run cut before its end)."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError):
    return None
  counts = dict.fromkeys(OUTCOMES, 0)
  for case in root.iter("testcase"):
    tags = {child.tag for child in case}
    if "failure" in tags:
      counts["failed"] += 1
    elif "error" in tags:
      counts["errors"] += 1
    elif "skipped" in tags:
      counts["skipped"] += 1
    else:
      counts["passed"] += 1
  return counts


_VERBOSE = re.compile(r"::\S*.*\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b|"
                      r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b.*::")


def log_counts(path: str) -> dict[str, int]:
  """Outcome counts from pytest's verbose lines (``-v``, with or without xdist)."""
  counts = dict.fromkeys(OUTCOMES, 0)
  key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "SKIPPED": "skipped",
         "XFAIL": "skipped", "ERROR": "errors"}
  try:
    with open(path, errors="replace") as f:
      for line in f:
        match = _VERBOSE.search(line)
        if match:
          counts[key[match.group(1) or match.group(2)]] += 1
  except OSError:
    pass
  return counts


def pytest_counts(log: str, junit: str | None = None) -> dict[str, int]:
  counts = junit_counts(junit) if junit else None
  if counts is None:
    counts = log_counts(log)
    counts["complete"] = 0
  else:
    counts["complete"] = 1
  return counts


def format_counts(counts: dict[str, int]) -> str:
  text = ", ".join(f"{counts[k]} {k}" for k in OUTCOMES if counts.get(k))
  text = text or "no test ran"
  return text if counts.get("complete", 1) else text + " before the cut"


# --- compute-sanitizer ---------------------------------------------------------------------------

_PREFIX = "========= "
_NOT_ERRORS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY", "Target application",
               "Error: ", "Warning: ")


def sanitizer_counts(path: str) -> dict:
  """``{"errors": N (the tool's summary), "shown": K, "flaxdcn": F, "elsewhere": K - F,
  "first": [header of the first few flaxdcn errors], "summary": bool}`` from a compute-sanitizer
  log. An error is flaxdcn's when its record (kernel name, device or host frames) names flaxdcn."""
  records: list[list[str]] = []
  total, summary = 0, False
  try:
    with open(path, errors="replace") as f:
      lines = f.read().splitlines()
  except OSError:
    lines = []
  for line in lines:
    if not line.startswith(_PREFIX.rstrip()):
      continue
    body = line[len(_PREFIX):] if line.startswith(_PREFIX) else ""
    match = re.match(r"ERROR SUMMARY: (\d+) error", body)
    if match:
      total, summary = int(match.group(1)), True
      continue
    if body and not body[0].isspace() and not body.startswith(_NOT_ERRORS):
      records.append([body])
    elif body and records:
      records[-1].append(body)
  ours = [r for r in records if any("flaxdcn" in line for line in r)]
  return {"errors": total if summary else len(records), "shown": len(records),
          "flaxdcn": len(ours), "elsewhere": len(records) - len(ours),
          "first": [r[0] for r in ours[:3]], "summary": summary}


def format_sanitizer(counts: dict) -> str:
  if not counts["summary"] and not counts["shown"]:
    return "no sanitizer summary"
  text = f"{counts['flaxdcn']} errors in flaxdcn"
  if counts["elsewhere"]:
    text += f", {counts['elsewhere']} elsewhere (not counted; see the log)"
  if counts["errors"] > counts["shown"]:
    text += f", {counts['errors'] - counts['shown']} not shown"
  return text


# --- benchmark -----------------------------------------------------------------------------------

COLUMNS = ("shape", "dtype", "op", "impl", "pass", "ms", "x base", "base", "x peer", "temp MiB",
           "input MiB", "temp / input")


def _cell(row: dict, column: str) -> str:
  value = {"impl": row.get("implementation"), "pass": row.get("pass_"), "ms": row.get("ms"),
           "x base": row.get("ratio_dense"), "base": (row.get("baseline") or "").split("/")[0],
           "x peer": row.get("ratio_peer"), "temp MiB": row.get("temp_mib"),
           "input MiB": row.get("input_mib"), "temp / input": row.get("temp_per_input")}.get(
               column, row.get(column))
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.3f}" if column == "x peer" else f"{value:.1f}" if column.endswith("MiB") \
        else f"{value:.2f}"
  return str(value)


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return "\n".join(lines)


def merge_benchmark(out: str, paths: list[str]) -> int:
  """Every group's rows in one file (the first group's environment); returns the row count."""
  environment, rows = None, []
  for path in paths:
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      continue
    environment = environment or data.get("environment")
    rows += data.get("rows", [])
  with open(out, "w") as f:
    json.dump({"environment": environment, "rows": rows}, f, indent=1)
  return len(rows)


# --- the report ----------------------------------------------------------------------------------

def _load_json(path: str, default):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def _steps(work: str) -> list[dict]:
  """steps.tsv: ``name, status, seconds, budget, detail`` per line, written by .ci/gpu-check."""
  steps = []
  try:
    with open(os.path.join(work, "steps.tsv")) as f:
      for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 5:
          steps.append(dict(zip(("step", "status", "seconds", "budget", "detail"), parts)))
  except OSError:
    pass
  return steps


def report(work: str, out: str) -> int:
  """Prints the per-step summary; writes summary.json and gpu-table.md to ``out``."""
  meta = _load_json(os.path.join(work, "meta.json"), {})
  facts = _load_json(os.path.join(work, "preflight.json"), {})
  build = _load_json(os.path.join(work, "build-info.json"), None) or facts.get("build_info") or {}
  bench = _load_json(os.path.join(out, "benchmark.json"), {"rows": []})
  steps = _steps(work)
  versions = facts.get("versions", {})
  version = lambda name: versions.get(name) or "not installed"

  widths = (11, 34, 6, 7)
  print(f"{'step':{widths[0]}s} {'result':{widths[1]}s} {'time':>{widths[2]}s} "
        f"{'budget':>{widths[3]}s}  detail")
  for s in steps:
    print(f"{s['step']:{widths[0]}s} {s['status']:{widths[1]}s} {s['seconds']:>{widths[2]}s} "
          f"{s['budget']:>{widths[3]}s}  {s['detail']}")

  gpu = meta.get("gpu") or {}
  device = gpu.get("name") or facts.get("device") or "no GPU"
  capability = gpu.get("compute_cap") or facts.get("compute_capability")
  driver = gpu.get("driver")
  cuda_driver = build.get("cuda_driver")
  runtime = build.get("cuda_runtime")
  plugin = versions.get("jax-cuda13-plugin") or versions.get("jax-cuda12-plugin")
  environment = [
      ("device", device + (f" (compute capability {capability}"
                           + (f", {gpu['memory']}" if gpu.get("memory") else "") + ")"
                           if capability else "")),
      ("driver", (driver or "unknown") + (f" (CUDA {'.'.join(map(str, cuda_driver))})"
                                          if cuda_driver else "")),
      ("CUDA", f"{meta.get('nvcc') or 'nvcc unknown'}; "
       + (f"flaxdcn built for {build['cuda_architectures']}" if build.get("cuda_architectures")
          else "flaxdcn not built")
       + (f", runtime {'.'.join(map(str, runtime))}" if runtime else "")),
      ("jax / jaxlib", f"{version('jax')} / {version('jaxlib')}"
       + (f" (CUDA plugin {plugin})" if plugin else "")),
      ("torch / torchvision", f"{version('torch')} / {version('torchvision')}"),
      ("python", facts.get("python", "unknown")),
      ("date", meta.get("date", "")),
      ("command", f"`{meta.get('command', 'bash .ci/gpu-check')}`"),
  ]
  title = "GPU check" + (" (dry run: nothing ran on a GPU)" if meta.get("dry_run") else "")
  parts = [f"### {title}: {device}, {meta.get('date', '')[:10]}", "",
           markdown_table(("", ""), environment), "",
           markdown_table(("step", "result", "time", "budget", "detail"),
                          [(s["step"], s["status"], s["seconds"], s["budget"], s["detail"])
                           for s in steps])]
  rows = bench.get("rows", [])
  if rows:
    groups = ", ".join(meta.get("benchmark_groups", []))
    parts += ["", f"Benchmark: `{meta.get('benchmark_command', '')}`, one run per group "
              f"(SHAPE DTYPE: {groups}); medians in ms, `x base` against the row named in `base`, "
              "`x peer` against torchvision in the same run.", "",
              markdown_table(COLUMNS, [[_cell(r, c) for c in COLUMNS] for r in rows])]
  text = "\n".join(parts) + "\n"
  with open(os.path.join(out, "gpu-table.md"), "w") as f:
    f.write(text)
  summary = dict(meta, environment=dict(environment), facts=facts, build_info=build, steps=steps,
                 benchmark_rows=len(rows))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("collect").add_argument("nodeids")
  p = sub.add_parser("pytest")
  p.add_argument("log")
  p.add_argument("junit", nargs="?")
  sub.add_parser("sanitizer").add_argument("log")
  p = sub.add_parser("merge-benchmark")
  p.add_argument("out")
  p.add_argument("inputs", nargs="*")
  p = sub.add_parser("report")
  p.add_argument("work")
  p.add_argument("out")
  args = parser.parse_args(argv)
  if args.command == "collect":
    print(collect_summary(read_nodeids(args.nodeids)))
  elif args.command == "pytest":
    counts = pytest_counts(args.log, args.junit)
    print(" ".join(f"{k}={v}" for k, v in counts.items()), "|", format_counts(counts))
  elif args.command == "sanitizer":
    counts = sanitizer_counts(args.log)
    print(f"flaxdcn={counts['flaxdcn']} elsewhere={counts['elsewhere']} "
          f"summary={int(counts['summary'])} |", format_sanitizer(counts))
    for header in counts["first"]:
      print("  first:", header)
  elif args.command == "merge-benchmark":
    print(merge_benchmark(args.out, args.inputs))
  else:
    return report(args.work, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
