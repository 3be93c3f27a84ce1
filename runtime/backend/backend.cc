#include "runtime/backend/backend.h"

#include "runtime/core/block_scaled_format.h"
#include "runtime/core/packed_bf16_format.h"
#include "runtime/core/quant_format.h"

namespace ef::runtime {

Buffer::~Buffer() {
  if (backend_ && ptr_) backend_->Free(ptr_, bytes_);
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (backend_ && ptr_) backend_->Free(ptr_, bytes_);
    backend_ = o.backend_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.backend_ = nullptr;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

Status CheckWeightType(const char* backend, DType dtype, int64_t cols) {
  int64_t block = 0;
  if (IsQuantized(dtype) && !QuantFormat::Of(dtype).divides(cols)) block = QuantFormat::Of(dtype).group;
  if (IsBlockScaled(dtype) && !BlockScaledFormat::Of(dtype).divides(cols))
    block = BlockScaledFormat::Of(dtype).block_cols;
  if (dtype == DType::kPbf16 && !PackedBf16Format::divides(cols))
    return InvalidArgument(std::string(backend) + ": a PBF16 weight's cols (" + std::to_string(cols) +
                           ") must be a multiple of " + std::to_string(PackedBf16Format::kGroup) + " up to " +
                           std::to_string(PackedBf16Format::kMaxCols));
  if (block > 0)
    return InvalidArgument(std::string(backend) + ": a " + DTypeName(dtype) + " weight's cols (" +
                           std::to_string(cols) + ") must be a multiple of its group (" + std::to_string(block) + ")");
  if (!IsPackedWeight(dtype) && !IsFloatWeight(dtype))
    return InvalidArgument(std::string(backend) + ": weights must be F32, F16, BF16, Q8G, Q4G, MXFP4 or FP8B128, got " +
                           DTypeName(dtype));
  return Status::Ok();
}

StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int device) {
  if (name == "cpu") return MakeCpuBackend();
  if (name == "cuda") return MakeCudaBackend(device);
  if (name == "auto") {
    if (CudaDeviceAvailable()) return MakeCudaBackend(device);
    return MakeCpuBackend();
  }
  return InvalidArgument("unknown backend \"" + name + "\" (expected cpu, cuda or auto)");
}

#ifndef EF_HAVE_CUDA_BACKEND
StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int) {
  return Unavailable("this expertflow was built without the CUDA backend (configure with -DEF_CUDA=ON)");
}
bool CudaDeviceAvailable() { return false; }
#endif

}  // namespace ef::runtime
