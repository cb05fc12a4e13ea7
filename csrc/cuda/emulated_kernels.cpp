// kernels.cu compiled by the host compiler, with CUDA's keywords, indices, launches and runtime
// calls emulated on the CPU (csrc/cuda/emulation.h): the kernels of fusedopt._cuda_emulated.
#include "cuda/emulation.h"
// (emulation.h first: kernels.cu's source is read with its definitions.)
#include "cuda/kernels.cu"
