"""What the tests that build C++ on the host share (the sanitizer, SIMT and AVX2 drivers)."""

import os
import shutil


def host_compiler() -> str | None:
  """The C++ compiler for host builds: ``$CXX``, else the first of g++, clang++ and c++ on PATH;
  None when there is none (the tests skip)."""
  for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None
