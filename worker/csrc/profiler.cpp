// libtorch's Kineto profiler, which tch does not wrap: start recording operators (and, on a
// GPU, CUDA kernels and copies), then stop and write a Chrome trace (the format
// torch.profiler's export_chrome_trace writes). Errors come back as a malloc'd message.

#include <torch/csrc/autograd/profiler_kineto.h>

#include "error_message.h"
#include <cstring>
#include <set>
#include <string>

namespace {

using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

ProfilerConfig config() { return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/true); }

}  // namespace

extern "C" {

// Starts recording CPU operators, and CUDA activity when `cuda` is non-zero.
char *braid_profiler_start(int cuda) {
  try {
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(config(), activities);
    torch::autograd::profiler::enableProfiler(config(), activities);
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

// Stops recording and writes the Chrome trace to `path`.
char *braid_profiler_stop(const char *path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

}  // extern "C"
