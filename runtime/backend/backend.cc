#include "runtime/backend/backend.h"

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
