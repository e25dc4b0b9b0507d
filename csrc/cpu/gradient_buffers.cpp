#include "cpu/gradient_buffers.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>

#ifndef _WIN32
#include <pthread.h>
#endif

#include <cstdlib>
#include <deque>
#include <mutex>
#include <optional>

namespace flexkd::cpu {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;

size_t capacity_from_env() {
  const char* value = std::getenv("FLEXKD_CPU_GRAD_CACHE_MIB");
  if (value == nullptr || *value == '\0') return size_t{512} << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && mib >= 0,
                    "FLEXKD_CPU_GRAD_CACHE_MIB must be a whole number of MiB >= 0, got '", value, "'");
  return static_cast<size_t>(mib) << 20;
}

struct Block {
  void* data;
  size_t bytes;
};

class Cache {
 public:
  // A cached block of at least `bytes` and at most twice that, or none: the smallest such, and of
  // those the one freed last (likeliest still in the CPU's caches).
  std::optional<Block> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = blocks_.rend();
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes >= bytes && it->bytes <= 2 * bytes && (best == blocks_.rend() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best == blocks_.rend()) return std::nullopt;
    const Block block = *best;
    blocks_.erase(std::next(best).base());
    held_ -= block.bytes;
    return block;
  }

  void give_back(Block block) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (block.bytes > capacity_) {
      lock.unlock();
      c10::free_cpu(block.data);
      return;
    }
    std::deque<Block> dropped;
    while (held_ + block.bytes > capacity_) {
      dropped.push_back(blocks_.front());
      held_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
    blocks_.push_back(block);
    held_ += block.bytes;
    lock.unlock();
    for (const Block& old : dropped) c10::free_cpu(old.data);
  }

  size_t capacity() const { return capacity_; }

  // Held across fork() (pthread_atfork), so a child never starts with the mutex locked by a thread
  // that does not exist there.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  const size_t capacity_ = capacity_from_env();
  std::mutex mutex_;
  std::deque<Block> blocks_;  // oldest first
  size_t held_ = 0;
};

// Never destroyed: a gradient may be freed during interpreter shutdown, after static destructors ran.
Cache& cache() {
  static Cache* instance = [] {
    auto* created = new Cache();
#ifndef _WIN32
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
#endif
    return created;
  }();
  return *instance;
}

}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes || cache().capacity() < bytes) return at::empty(sizes, options);
  Block block = cache().take(bytes).value_or(Block{nullptr, bytes});
  if (block.data == nullptr) block.data = c10::alloc_cpu(bytes);
  return at::from_blob(
      block.data, sizes, [block](void*) { cache().give_back(block); }, options);
}

}  // namespace flexkd::cpu
