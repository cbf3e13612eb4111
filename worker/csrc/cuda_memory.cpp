// Memory statistics of libtorch's CUDA caching allocator for one device: what it holds now and
// at most (reserved from the device, and allocated to tensors). Built with CUDA headers only
// (BRAID_CUDA); otherwise the calls report that the build has no CUDA. Errors come back as a
// malloc'd message (null on success).

#include <torch/torch.h>

#include "error_message.h"
#include <cstring>

#ifdef BRAID_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

extern "C" {

// stats[0..4]: bytes allocated now, allocated at most, reserved now, reserved at most (since
// the process started or the last braid_cuda_reset_peak_memory).
char *braid_cuda_memory(int64_t device, int64_t *stats) {
#ifdef BRAID_CUDA
  try {
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    stats[0] = s.allocated_bytes[all].current;
    stats[1] = s.allocated_bytes[all].peak;
    stats[2] = s.reserved_bytes[all].current;
    stats[3] = s.reserved_bytes[all].peak;
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
#else
  (void)device;
  (void)stats;
  return strdup("this build of braid has no CUDA (libtorch's or CUDA's headers were missing)");
#endif
}

// Starts the "at most" figures again from what is held now.
char *braid_cuda_reset_peak_memory(int64_t device) {
#ifdef BRAID_CUDA
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
#else
  (void)device;
  return strdup("this build of braid has no CUDA");
#endif
}

}  // extern "C"
