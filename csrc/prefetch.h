// Software prefetch of small objects, for host loops over many tensors (csrc/host) and the CPU
// kernels over many small tensors (csrc/cpu), where each tensor's objects and data are
// separate allocations that no hardware prefetcher predicts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fsam_fused {

constexpr size_t kCacheLine = 64;

// Asks for every cache line that the `bytes` bytes at `start` touch (an object at an address that
// is not a multiple of the line size straddles one more line than bytes / kCacheLine); never
// faults, whatever the address.
inline void prefetch_bytes(const void* start, size_t bytes) {
  if (bytes == 0) {
    return;
  }
  const uintptr_t end = reinterpret_cast<uintptr_t>(start) + bytes;
  for (uintptr_t line = reinterpret_cast<uintptr_t>(start) & ~uintptr_t{kCacheLine - 1}; line < end;
       line += kCacheLine) {
    __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

}  // namespace fsam_fused
