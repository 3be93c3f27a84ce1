// What the '#' header and JSON of a GPU benchmark report about the device and its software:
// name, SM count, memory, CUDA runtime/driver and cuBLAS versions.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/core/build_info.h"

namespace ef::perf {

struct DeviceInfo {
  cudaDeviceProp prop{};
  std::string cuda_runtime, driver, cublas;
};

// False when no device is visible.
inline bool QueryDeviceInfo(DeviceInfo* info) {
  int dev = 0, rt = 0, drv = 0, major = 0, minor = 0, patch = 0;
  cudaGetDevice(&dev);
  if (cudaGetDeviceProperties(&info->prop, dev) != cudaSuccess) return false;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  cublasGetProperty(MAJOR_VERSION, &major);
  cublasGetProperty(MINOR_VERSION, &minor);
  cublasGetProperty(PATCH_LEVEL, &patch);
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  info->cuda_runtime = version(rt);
  info->driver = version(drv);
  info->cublas = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  return true;
}

// The fields every benchmark's JSON document starts with: which bench, the build, the device and
// its software.
inline nlohmann::json DeviceJson(const char* bench, const DeviceInfo& info) {
  return {{"bench", bench},
          {"git", EF_GIT_SHA},
          {"build_type", EF_BUILD_TYPE},
          {"device", info.prop.name},
          {"cuda_runtime", info.cuda_runtime},
          {"driver", info.driver},
          {"cublas", info.cublas}};
}

}  // namespace ef::perf
