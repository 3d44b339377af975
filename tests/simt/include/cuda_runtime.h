// Stands in for the toolkit's cuda_runtime.h when the CUDA sources are compiled for the SIMT
// emulation (tests/simt/simt.h).
#include "../simt.h"
