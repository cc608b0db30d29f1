// The emulator self-test kernels (selftest.cu) compiled for the SIMT emulation.
#include "selftest.cu"
