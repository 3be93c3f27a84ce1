// CUDA_CHECK / CUBLAS_CHECK: turn a CUDA runtime or cuBLAS result code into a Status that names
// the statement and file:line, or (the _LOG forms, for void paths such as the Backend ops) log
// it once with the same breadcrumb and hand the error to a sink.
//
//   CUDA_CHECK(cudaMemcpyAsync(...));           // in a function returning Status / StatusOr
//   CUDA_CHECK_LOG(cudaGetLastError(), &err_);  // in a void function; err_ keeps the first error
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <string>

#include "runtime/core/logging.h"
#include "runtime/core/status.h"

namespace ef::runtime::cuda {

inline std::string CudaErrorText(cudaError_t e, const char* stmt, const char* file, int line) {
  return std::string(stmt) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") at " + file + ":" +
         std::to_string(line);
}

inline std::string CublasErrorText(cublasStatus_t s, const char* stmt, const char* file, int line) {
  return std::string(stmt) + " failed: " + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ") at " + file +
         ":" + std::to_string(line);
}

}  // namespace ef::runtime::cuda

#define CUDA_CHECK(stmt)                                                                                  \
  do {                                                                                                    \
    cudaError_t ef_cuda_err_ = (stmt);                                                                    \
    if (ef_cuda_err_ != cudaSuccess) [[unlikely]]                                                         \
      return ::ef::Internal(::ef::runtime::cuda::CudaErrorText(ef_cuda_err_, #stmt, __FILE__, __LINE__)); \
  } while (0)

#define CUBLAS_CHECK(stmt)                                                                                   \
  do {                                                                                                       \
    cublasStatus_t ef_cublas_st_ = (stmt);                                                                   \
    if (ef_cublas_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                                 \
      return ::ef::Internal(::ef::runtime::cuda::CublasErrorText(ef_cublas_st_, #stmt, __FILE__, __LINE__)); \
  } while (0)

// Logs the failure (lowercase subsystem CUDA) and stores it in *sink (a ::ef::Status*) if that
// holds no earlier error. Evaluates to true on success.
#define CUDA_CHECK_LOG(stmt, sink)                                                                     \
  [&]() -> bool {                                                                                      \
    cudaError_t ef_cuda_err_ = (stmt);                                                                 \
    if (ef_cuda_err_ == cudaSuccess) [[likely]]                                                        \
      return true;                                                                                     \
    std::string ef_msg_ = ::ef::runtime::cuda::CudaErrorText(ef_cuda_err_, #stmt, __FILE__, __LINE__); \
    EF_LOG(ERROR, CUDA, "%s", ef_msg_.c_str());                                                        \
    if ((sink)->ok()) *(sink) = ::ef::Internal(std::move(ef_msg_));                                    \
    return false;                                                                                      \
  }()

#define CUBLAS_CHECK_LOG(stmt, sink)                                                                      \
  [&]() -> bool {                                                                                         \
    cublasStatus_t ef_cublas_st_ = (stmt);                                                                \
    if (ef_cublas_st_ == CUBLAS_STATUS_SUCCESS) [[likely]]                                                \
      return true;                                                                                        \
    std::string ef_msg_ = ::ef::runtime::cuda::CublasErrorText(ef_cublas_st_, #stmt, __FILE__, __LINE__); \
    EF_LOG(ERROR, CUDA, "%s", ef_msg_.c_str());                                                           \
    if ((sink)->ok()) *(sink) = ::ef::Internal(std::move(ef_msg_));                                       \
    return false;                                                                                         \
  }()
