// The C API launcher of csrc/capi/cache.cu compiled for the SIMT emulation (host compiler).
#include "capi/cache.cu"
