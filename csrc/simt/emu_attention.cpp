// The C API launcher of csrc/capi/attention.cu compiled for the SIMT emulation (host compiler).
#include "capi/attention.cu"
