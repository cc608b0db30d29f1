// SIMT emulation: the part of the CUDA runtime API the kernels and their launchers use. Launches
// run to completion on the CPU (csrc/simt/runtime.cpp) before the call returns.
#pragma once
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../prelude.h"

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned int x, y, z;
  } clusterDim;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA;
  int maxDynamicSharedSizeBytes, preferredShmemCarveout;
};

namespace simt {
constexpr int kMaxSmemPerBlock = 227 * 1024;  // sm_90 opt-in limit
constexpr int kDefaultDynamicSmem = 48 * 1024;
cudaError_t& last_runtime_error();
inline cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) last_runtime_error() = e;
  return e;
}
}  // namespace simt

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::last_runtime_error();
  simt::last_runtime_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return simt::last_runtime_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (SIMT emulation)";
    default: return "SIMT emulation error";
  }
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = simt::config().num_sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = simt::kDefaultDynamicSmem; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = simt::kMaxSmemPerBlock; return cudaSuccess;
  }
  return simt::record(cudaErrorInvalidValue);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > simt::kMaxSmemPerBlock) return simt::record(cudaErrorInvalidValue);
    simt::record_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* fa, void (*)(P...)) {
  *fa = cudaFuncAttributes{};
  fa->maxThreadsPerBlock = 1024;
  fa->ptxVersion = 90;
  fa->binaryVersion = 90;
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, void (*)(P...), const cudaLaunchConfig_t* cfg) {
  unsigned c = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      c = cfg->attrs[i].val.clusterDim.x * cfg->attrs[i].val.clusterDim.y *
          cfg->attrs[i].val.clusterDim.z;
  *n = (c <= 8 && cfg->dynamicSmemBytes <= static_cast<size_t>(simt::kMaxSmemPerBlock))
           ? simt::config().num_sms / static_cast<int>(c)
           : 0;
  return cudaSuccess;
}

template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Exp...),
                               Act&&... args) {
  using Tuple = std::tuple<std::decay_t<Exp>...>;
  struct Closure {
    void (*kernel)(Exp...);
    Tuple args;
  };
  Closure closure{kernel, Tuple(std::forward<Act>(args)...)};
  simt::LaunchSpec spec{};
  spec.grid = {cfg->gridDim.x, cfg->gridDim.y, cfg->gridDim.z};
  spec.block = {cfg->blockDim.x, cfg->blockDim.y, cfg->blockDim.z};
  spec.cluster = {1, 1, 1};
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      spec.cluster = {cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y,
                      cfg->attrs[i].val.clusterDim.z};
  spec.dynamic_smem = cfg->dynamicSmemBytes;
  spec.kernel = reinterpret_cast<const void*>(kernel);
  auto body = [](void* c) {
    Closure* cl = static_cast<Closure*>(c);
    Tuple copy = cl->args;  // each thread gets its own copy of the parameters
    std::apply(cl->kernel, copy);
  };
  return simt::record(static_cast<cudaError_t>(simt::run_launch(spec, body, &closure)));
}
