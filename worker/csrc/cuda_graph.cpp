// CUDA graphs of a whole training step through libtorch's at::cuda::CUDAGraph: what the caller
// enqueues between capture_begin and capture_end is recorded on a side stream (taken from
// libtorch's pool, with the activations in the graph's private memory pool) instead of run, and
// replay launches the recording on the current stream in one call. Built only when libtorch has
// its CUDA headers and the CUDA runtime headers are found (BRAID_CUDA); otherwise every
// call reports that the build has no CUDA graphs. Errors come back as a malloc'd message (null on
// success).

#include <torch/torch.h>

#include "error_message.h"
#include <cstring>
#include <optional>
#include <string>

#ifdef BRAID_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

#ifdef BRAID_CUDA
// (c10's stream guards are avoided: their inline device hooks would tie this file to cudart.)
struct Graph {
  at::cuda::CUDAGraph graph;
  // What was current before the capture made its side stream (and device) current.
  c10::DeviceIndex previous_device = 0;
  std::optional<c10::cuda::CUDAStream> previous_stream;

  void restore() {
    if (previous_stream) {
      c10::cuda::setCurrentCUDAStream(*previous_stream);
      c10::cuda::set_device(previous_device);
      previous_stream.reset();
    }
  }
};
#endif

}  // namespace

extern "C" {

// 1 when this build can capture CUDA graphs.
int braid_cuda_graphs_built() {
#ifdef BRAID_CUDA
  return 1;
#else
  return 0;
#endif
}

// Waits for the device, returns the memory cached by earlier steps, makes a pooled side stream
// of `device` current and starts capturing on it; *out receives the graph, which the caller ends with braid_graph_capture_end and frees
// with braid_graph_free. Capture is thread-local: other threads (data loading, a collective's
// watchdog) may keep calling CUDA.
char *braid_graph_capture_begin(int64_t device, void **out) {
  *out = nullptr;
#ifdef BRAID_CUDA
  Graph *g = nullptr;
  try {
    g = new Graph();
    auto index = static_cast<c10::DeviceIndex>(device);
    g->previous_device = c10::cuda::current_device();
    c10::cuda::set_device(index);
    g->previous_stream = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::device_synchronize();
    // The eager steps before the capture left their activations cached in the general pool;
    // the graph gets a pool of its own, so give them back rather than hold both.
    c10::cuda::CUDACachingAllocator::emptyCache();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index));
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    *out = g;
    return nullptr;
  } catch (const std::exception &e) {
    if (g != nullptr) g->restore();
    delete g;
    return braid::error_message(e);
  }
#else
  (void)device;
  return strdup("this build of braid has no CUDA graphs (libtorch's or CUDA's headers were missing)");
#endif
}

// Ends the capture started by braid_graph_capture_begin and restores the previous stream. After
// a failed capture (an error inside it, or an operation a graph cannot hold) it reports why; the
// graph must then be freed, not replayed.
char *braid_graph_capture_end(void *graph) {
#ifdef BRAID_CUDA
  auto *g = static_cast<Graph *>(graph);
  char *message = nullptr;
  try {
    g->graph.capture_end();
  } catch (const std::exception &e) {
    message = braid::error_message(e);
  }
  g->restore();
  return message;
#else
  (void)graph;
  return strdup("this build of braid has no CUDA graphs");
#endif
}

// Launches the captured work on the current stream.
char *braid_graph_replay(void *graph) {
#ifdef BRAID_CUDA
  try {
    static_cast<Graph *>(graph)->graph.replay();
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
#else
  (void)graph;
  return strdup("this build of braid has no CUDA graphs");
#endif
}

// Frees a graph and its memory pool (null is allowed).
void braid_graph_free(void *graph) {
#ifdef BRAID_CUDA
  delete static_cast<Graph *>(graph);
#else
  (void)graph;
#endif
}

}  // extern "C"
