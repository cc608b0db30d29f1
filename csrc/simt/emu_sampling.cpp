// The C API launcher of csrc/capi/sampling.cu compiled for the SIMT emulation (host compiler).
#include "capi/sampling.cu"
