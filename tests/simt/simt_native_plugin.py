"""pytest plugin (``-p simt_native_plugin``): ``flaxdcn._native`` becomes the module built from
tests/simt/native.cc at ``$FLAXDCN_SIMT_NATIVE``, before flaxdcn is imported, so the "ffi"
implementation on the CPU runs the CUDA FFI handlers and kernels under the SIMT emulation."""

import importlib.machinery
import importlib.util
import os
import sys

_PATH = os.environ["FLAXDCN_SIMT_NATIVE"]
_LOADER = importlib.machinery.ExtensionFileLoader("flaxdcn._native", _PATH)
_SPEC = importlib.util.spec_from_file_location("flaxdcn._native", _PATH, loader=_LOADER)
_MODULE = importlib.util.module_from_spec(_SPEC)
_LOADER.exec_module(_MODULE)
sys.modules["flaxdcn._native"] = _MODULE
