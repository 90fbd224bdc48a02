// Software prefetch of small objects, for host loops over many tensors (csrc/host) and the CPU
// kernels over many small tensors (csrc/cpu), where each tensor's objects and data are
// separate allocations that no hardware prefetcher predicts.
#pragma once

#include <cstddef>

namespace fsam_fused {

constexpr size_t kCacheLine = 64;

// Asks for the cache lines of the `bytes` bytes at `start`; never faults, whatever the address.
inline void prefetch_bytes(const void* start, size_t bytes) {
  for (size_t offset = 0; offset < bytes; offset += kCacheLine) {
    __builtin_prefetch(static_cast<const char*>(start) + offset);
  }
}

}  // namespace fsam_fused
