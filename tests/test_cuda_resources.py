"""The register budget of the CUDA kernels in the installed module.

Every kernel of the built module (``flaxdcn/_native*.so``, located through its import, so the
layout of the sources does not matter) must use at most ``REGISTER_BUDGET`` registers a thread and
no local memory, on every SASS architecture the module carries. The numbers come from
``cuobjdump -res-usage``, which reads them from the module's fat binary: ``REG`` is the register
count ptxas allocated, ``STACK`` the per-thread stack frame and ``LOCAL`` the static local memory,
both in bytes of local memory. Spilled registers live in the stack frame (the CUDA ABI spills to
the stack since sm_20), so ``STACK:0 LOCAL:0`` means nothing spills and nothing else (a local
array, a call's saved registers) lives in local memory either. The spill counts ptxas prints at
compile time are not recorded in the binary; the frame they need is.

128 registers at 256 threads a block keep two blocks on an SM (64 K registers on sm_80 and
sm_90); ``__launch_bounds__(kBlockThreads, MinBlocks(...))`` in ``xla_ext/`` gives each kernel its
cap, at most this budget.

cuobjdump comes with a full CUDA toolkit or with the ``nvidia-cuda-cuobjdump`` wheel (the
``test`` extra installs it on Linux). That nvcc on PATH produces a CUDA build at all is
``tests/test_ffi.py::test_cuda_kernels_compiled_where_nvcc_is_present``.
"""

import dataclasses
import glob
import importlib
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import flaxdcn

#: Registers a thread, at most, for every kernel.
REGISTER_BUDGET = 128

#: Kernel families every CUDA build holds, on every architecture (a parse that finds none of them
#: must not pass as "no kernel over budget").
KERNEL_FAMILIES = ("DeformIm2colKernel", "DeformIm2colBackwardKernel", "DeformRoiPoolKernel",
                   "DeformRoiPoolBackwardKernel", "Dcnv3Kernel", "Dcnv3BackwardKernel",
                   "MsDeformAttnKernel", "MsDeformAttnBackwardKernel", "MaxAbsKernel",
                   "FinishFixedKernel", "StoreKernel")


@dataclasses.dataclass(frozen=True)
class KernelUsage:
  arch: str        # "sm_80"
  name: str        # mangled symbol
  registers: int
  stack: int       # bytes of stack frame a thread (spills, saved registers, local arrays)
  local: int       # bytes of static local memory a thread


def parse_res_usage(text):
  """The kernels of every ELF (SASS) section of ``cuobjdump -res-usage`` output.

  PTX sections carry no resource usage; they are skipped, and so are their lines.
  """
  usages, arch, elf, name = [], None, False, None
  for line in text.splitlines():
    if line.startswith("Fatbin "):
      elf, arch, name = line.startswith("Fatbin elf code"), None, None
    elif m := re.match(r"arch = (\S+)", line):
      arch = m.group(1)
    elif m := re.match(r"\s*Function (\S+):\s*$", line):
      name = m.group(1)
    elif name is not None and "REG:" in line:
      fields = dict(re.findall(r"(\w+):(\d+)", line))
      if elf:
        if arch is None or not {"REG", "STACK", "LOCAL"} <= fields.keys():
          raise ValueError(f"unexpected cuobjdump line for {name}: {line!r}")
        usages.append(KernelUsage(arch, name, int(fields["REG"]), int(fields["STACK"]),
                                  int(fields["LOCAL"])))
      name = None
  return usages


def violations(usages, budget=REGISTER_BUDGET):
  """One line for each kernel over `budget` registers or with local memory."""
  out = []
  for u in usages:
    problems = []
    if u.registers > budget:
      problems.append(f"{u.registers} registers > {budget}")
    if u.stack or u.local:
      problems.append(f"local memory (STACK:{u.stack} LOCAL:{u.local}: spills)")
    if problems:
      out.append(f"{u.arch} {demangle(u.name)}: {', '.join(problems)}")
  return out


def demangle(name):
  """The readable name, without its parameter list, where c++filt is installed; else the symbol."""
  cxxfilt = shutil.which("c++filt")
  if cxxfilt is None:
    return name
  text = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
  text = text.replace("(anonymous namespace)::", "")
  depth = 0
  for i, c in enumerate(text):
    depth += {"<": 1, ">": -1}.get(c, 0)
    if c == "(" and depth == 0 and i > 0:
      return text[:i]
  return text


def find_cuobjdump():
  """cuobjdump on PATH, beside nvcc, in the CUDA toolkit or in the nvidia-cuda-cuobjdump wheel."""
  if path := shutil.which("cuobjdump"):
    return path
  folders = []
  if nvcc := shutil.which("nvcc"):
    folders.append(os.path.dirname(os.path.realpath(nvcc)))
  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
    if home:
      folders.append(os.path.join(home, "bin"))
  spec = importlib.util.find_spec("nvidia")
  for root in (spec.submodule_search_locations or []) if spec else []:
    folders += sorted(glob.glob(os.path.join(root, "*", "bin")))
  for folder in folders:
    path = os.path.join(folder, "cuobjdump")
    if os.access(path, os.X_OK):
      return path
  return None


def _module_usages():
  info = flaxdcn.build_info()
  if not info["cuda"]:
    pytest.skip(f"the installed module has no CUDA kernels ({info})")
  tool = find_cuobjdump()
  if tool is None:
    pytest.skip("cuobjdump not found (a CUDA toolkit, or `pip install nvidia-cuda-cuobjdump`)")
  module = importlib.import_module("flaxdcn._native").__file__
  run = subprocess.run([tool, "-res-usage", module], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-4000:]
  return info, parse_res_usage(run.stdout)


def sass_architectures(spec):
  """The SASS architectures a CMAKE_CUDA_ARCHITECTURES list builds ("80-real,90-real,90-virtual"
  -> {"sm_80", "sm_90"}; a bare "80" builds SASS and PTX); None for "native", "all" and the like,
  which name no architecture."""
  archs = set()
  for entry in spec.split(","):
    if entry.endswith("-virtual"):
      continue
    entry = entry.removesuffix("-real")
    if not re.fullmatch(r"\d+[af]?", entry):
      return None
    archs.add("sm_" + entry)
  return archs


def test_sass_architectures():
  assert sass_architectures("80-real,90-real,90-virtual") == {"sm_80", "sm_90"}
  assert sass_architectures("75,90a-real") == {"sm_75", "sm_90a"}
  assert sass_architectures("native") is None


def test_every_kernel_within_the_register_budget_without_spills():
  info, usages = _module_usages()
  archs = sass_architectures(info["cuda_architectures"])
  found_archs = {u.arch for u in usages}
  assert found_archs, "no SASS in the module"
  if archs is not None:
    assert found_archs == archs, f"SASS architectures of the module (built for {archs})"
  for arch in sorted(found_archs):
    names = " ".join(u.name for u in usages if u.arch == arch)
    missing = [f for f in KERNEL_FAMILIES if f not in names]
    assert not missing, f"{arch}: no {missing} in the module"
  found = violations(usages)
  assert not found, "\n".join(found)


def test_the_check_fails_on_the_module_at_a_budget_of_32():
  """The same check, on the same module, at a budget every large kernel exceeds: it must name
  them (the check reads real numbers, not zeros)."""
  _, usages = _module_usages()
  found = violations(usages, budget=32)
  for family in ("DeformIm2colBackwardKernel", "DeformRoiPoolBackwardKernel",
                 "Dcnv3BackwardKernel", "MsDeformAttnBackwardKernel"):
    assert any(family in line and "registers > 32" in line for line in found), family


PLANTED = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4finePf:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6greedyPf:
  REG:242 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z7spillerPf:
  REG:48 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
code version = [9,0]
host = linux
compile_size = 64bit
compressed

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z5localPf:
  REG:128 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z4finePf:
  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_the_check_names_planted_offenders():
  usages = parse_res_usage(PLANTED)
  assert [(u.arch, u.name, u.registers) for u in usages] == [
      ("sm_80", "_Z4finePf", 40), ("sm_80", "_Z6greedyPf", 242), ("sm_80", "_Z7spillerPf", 48),
      ("sm_90", "_Z5localPf", 128), ("sm_90", "_Z4finePf", 128)]
  found = violations(usages)
  assert len(found) == 3, found
  # Names are demangled where c++filt exists: both spellings hold the function's name.
  assert found[0].startswith("sm_80") and "greedy" in found[0] and "242 registers > 128" in found[0]
  assert found[1].startswith("sm_80") and "spiller" in found[1] and "STACK:16" in found[1]
  assert found[2].startswith("sm_90") and "local" in found[2] and "LOCAL:8" in found[2]
