#include "parallel_tensors.h"

#include <ATen/Parallel.h>

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

namespace fsam_fused::host {
namespace {

// One call's work: chunks of [0, n) taken in order by whichever thread asks next.
struct Job {
  c10::function_ref<bool(size_t, size_t)> f;
  size_t n;
  std::atomic<size_t> next{0};
  std::atomic<bool> all{true};
  std::exception_ptr error;  // the helper's, rethrown by the caller

  // Runs chunks until none is left (or one returned false: then no more are taken).
  void run() {
    for (;;) {
      const size_t begin = next.fetch_add(kTensorsPerChunk, std::memory_order_relaxed);
      if (begin >= n) {
        return;
      }
      if (!f(begin, std::min(n, begin + kTensorsPerChunk))) {
        all.store(false, std::memory_order_relaxed);
        next.store(n, std::memory_order_relaxed);
        return;
      }
    }
  }
};

// The helper thread and what it shares with the caller. Never destroyed (a thread waiting on its
// condition variable may outlive static destructors at exit); a forked child leaks its copy, whose
// thread does not exist there, and starts another.
struct Helper {
  std::atomic<uint64_t> posted{0};  // calls so far: the helper looks for work when it changes
  std::mutex mutex;
  std::condition_variable wake;
  // The job a caller runs now, null between calls. The helper counts itself `active` before it
  // reads `open`, and the caller clears `open` before it reads `active` (all sequentially
  // consistent), so either the helper sees no job or the caller sees the helper and waits for it.
  std::atomic<Job*> open{nullptr};
  std::atomic<int> active{0};

  void post() {
    posted.fetch_add(1);
    { const std::lock_guard<std::mutex> lock(mutex); }  // (the helper is in wait() or has seen the call)
    wake.notify_one();
  }

  // It sleeps as soon as a call is done, not spinning for the next: the step's kernels run on
  // torch's threads between its calls, and a spinning helper would hold a core they wait for.
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return posted.load() != seen; });
        seen = posted.load();
      }
      active.fetch_add(1);
      if (Job* job = open.load()) {
        try {
          job->run();
        } catch (...) {
          job->error = std::current_exception();
          job->all.store(false, std::memory_order_relaxed);
          job->next.store(job->n, std::memory_order_relaxed);
        }
      }
      active.fetch_sub(1, std::memory_order_release);
    }
  }
};

std::atomic<Helper*> helper_instance{nullptr};
std::mutex start_mutex;

void forget_helper_in_child() {
  helper_instance.store(nullptr);
  new (&start_mutex) std::mutex();  // (it may have been held by another thread at the fork)
}

// The helper, started on first use; null if no thread can be started (the caller works alone).
Helper* helper() {
  Helper* h = helper_instance.load(std::memory_order_acquire);
  if (h != nullptr) {
    return h;
  }
  std::lock_guard<std::mutex> lock(start_mutex);
  h = helper_instance.load();
  if (h != nullptr) {
    return h;
  }
  static const bool registered = pthread_atfork(nullptr, nullptr, forget_helper_in_child) == 0;
  if (!registered) {
    return nullptr;
  }
  h = new Helper();
  // Started with the asynchronous signals blocked (a new thread inherits the mask): they are for
  // the threads that handle them, Python's. A fault of its own still reaches faulthandler.
  sigset_t blocked;
  sigset_t before;
  sigfillset(&blocked);
  for (const int fault : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    sigdelset(&blocked, fault);
  }
  pthread_sigmask(SIG_BLOCK, &blocked, &before);
  bool started = true;
  try {
    std::thread(&Helper::loop, h).detach();
  } catch (const std::system_error&) {
    started = false;
  }
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (!started) {
    delete h;
    return nullptr;
  }
  helper_instance.store(h, std::memory_order_release);
  return h;
}

// Ends a call's job however the caller leaves it: the helper takes no new chunk after this and
// its running chunk (if any) has finished, so the job and everything its chunks read may go.
struct CloseJob {
  Helper* h;
  ~CloseJob() {
    h->open.store(nullptr);  // (a helper already in the job stops when no chunk is left)
    for (int spins = 0; h->active.load() != 0; ++spins) {
      if (spins > 64) {
        std::this_thread::yield();  // (the helper may share this core: let it finish its chunk)
      }
    }
  }
};

}  // namespace

bool all_chunks(size_t n, c10::function_ref<bool(size_t, size_t)> f) {
  if (n <= 2 * kTensorsPerChunk || at::get_num_threads() < 2 || at::in_parallel_region()) {
    return n == 0 || f(0, n);
  }
  Helper* h = helper();
  Job job{f, n};
  Job* none = nullptr;
  if (h == nullptr || !h->open.compare_exchange_strong(none, &job)) {  // (another call is running)
    return f(0, n);
  }
  {
    const CloseJob close{h};
    h->post();
    try {
      job.run();
    } catch (...) {
      job.next.store(n);  // (so the helper takes no more chunks while this unwinds)
      throw;
    }
  }
  if (job.error) {
    std::rethrow_exception(job.error);
  }
  return job.all.load(std::memory_order_relaxed);
}

}  // namespace fsam_fused::host
