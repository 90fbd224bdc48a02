// The host loops over a step's tensors (the scan, the kept lists' check) shared
// with one helper thread. Over many small tensors those loops wait on memory: each tensor is a
// chain of dependent loads (its Python object, TensorImpl, storage, autograd metadata) that
// prefetching overlaps only as far as one core's outstanding misses allow, and a second core
// brings its own.
//
// Not torch's intra-op pool (at::parallel_for): an OpenMP region waits for every thread of its
// team to arrive, so on busy cores (data-loader workers, other processes) a step of a few
// microseconds per region waited a scheduler timeslice per region, 100x slower; and a process
// forked after one hangs in its first region (libgomp is not fork-safe), which a model of small
// tensors never entered before. Here the calling thread takes chunks of the range itself and
// never waits for a helper that has not started: a helper that wakes late finds the work done.
// It waits only for a chunk the helper is running (a few microseconds), and a forked child
// starts its own helper.
//
// Only reads run on the helper, while the calling thread holds the GIL and
// waits for it: nothing there may reach Python, take or drop a reference to a tensor (dropping
// the last one could free a Python object), materialize a lazy copy-on-write storage (a write
// to memory that the calling thread may read), or depend on thread-local state (grad, inference
// and dispatch modes are the calling thread's). Each loop's comment says how it keeps to that.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstddef>

namespace fsam_fused::host {

// Tensors a thread takes at a time: small, so that the calling thread's wait for the helper's
// chunk is short, and a whole prefetch block (ParamScan's kPrefetchBlock).
constexpr size_t kTensorsPerChunk = 32;

// Whether `f(begin, end)` returned true for every chunk of [0, n) it was called on (it stops at
// the first false), the chunks shared between the calling thread and the helper. Runs on the
// calling thread alone where torch is set to one thread (torch.set_num_threads(1)), inside a
// parallel region, for a few chunks, or while another call is running. An exception in `f`
// reaches the caller, as from a serial loop, once the helper has finished its chunk.
bool all_chunks(size_t n, c10::function_ref<bool(size_t, size_t)> f);

}  // namespace fsam_fused::host
