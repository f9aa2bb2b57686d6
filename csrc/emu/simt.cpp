// The scheduler of the SIMT emulation (simt.h): blocks in a shuffled order, the threads of a block as fibers.
#include "emu/simt.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PYPERF_EMU_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace pyperf_emu {

__thread const BuiltIns* g_builtins = nullptr;

namespace {

constexpr int kMaxThreads = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned long long kMaxGridX = 2147483647ull;
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr size_t kMaxParams = 4096;
#if defined(PYPERF_EMU_ASAN)
constexpr size_t kStack = 256 * 1024;  // instrumented frames are larger
constexpr size_t kRedzone = 32;        // poisoned bytes after each __shared__ variable
#else
constexpr size_t kStack = 64 * 1024;
constexpr size_t kRedzone = 0;
#endif
constexpr size_t kArena = 2 * kMaxStaticShared;

// ---- context switch ----
#if defined(__x86_64__)
// switch_to(&save, to): saves the callee-saved registers and the FP control words on this stack, stores the stack
// pointer in *save, and resumes the context whose stack pointer is `to` (System V x86-64; no syscall, unlike
// swapcontext's signal-mask save).
extern "C" void pyperf_emu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .type pyperf_emu_switch,@function
pyperf_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pyperf_emu_switch,.-pyperf_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
struct Context {
  void* sp = nullptr;
};
void context_switch(Context& from, Context& to) { pyperf_emu_switch(&from.sp, to.sp); }
void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  *--sp = 0;                                    // entry's return address (it never returns): keeps ABI alignment
  *--sp = reinterpret_cast<uint64_t>(entry);    // where the first switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;        // rbp rbx r12-r15
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class Wait : uint8_t { kReady, kBarrier, kShuffle, kDone };

struct Thread {
  BuiltIns b;
  int linear = 0, lane = 0, warp = 0;
  Wait wait = Wait::kReady;
  Site site{nullptr, 0};
  bool or_reduce = false;
  int pred = 0, pred_result = 0;
  unsigned mask = 0;
  int src = 0;
  uint64_t value = 0, result = 0;
  Context ctx;
  char* stack = nullptr;
  void* fake_stack = nullptr;
  bool started = false;
};

// Thrown inside a fiber to unwind its stack (destroying what its frames hold) when its launch is abandoned.
struct Unwind {};

struct SharedVar {
  const void* key;
  void* ptr;
};

// One per host thread (autograd runs backward on its own thread): the launch being emulated and its fibers.
struct Emulator {
  const LaunchConfig* cfg = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const char* kernel = nullptr;  // __PRETTY_FUNCTION__ of the kernel, from its entry hook
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> threads;
  int nthreads = 0;
  Thread* running = nullptr;
  Context sched;
  std::string error;
  char* stacks = nullptr;
  // __shared__: one arena per block (kArena bytes), bump-allocated at first use of each declaration.
  char* arena = nullptr;
  size_t arena_cursor = 0, shared_bytes = 0, arena_dirty = 0;
  std::vector<SharedVar> shared_vars;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  uint64_t launches = 0;
  bool unwinding = false;  // an abandoned launch: a resumed fiber unwinds instead of going on

  Emulator() {
    const size_t bytes = kStack * kMaxThreads;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("pyperf_emu: cannot map fiber stacks");
    stacks = static_cast<char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(stacks + i * kStack, 4096, PROT_NONE);  // overflow guard
    arena = static_cast<char*>(std::aligned_alloc(64, kArena));
    std::memset(arena, 0xff, kArena);
#if defined(PYPERF_EMU_ASAN)
    ASAN_POISON_MEMORY_REGION(arena, kArena);
#endif
    threads.resize(kMaxThreads);
  }
};

thread_local Emulator* g_emu = nullptr;

Emulator& emu() {
  if (g_emu == nullptr) g_emu = new Emulator();  // lives as long as the host thread's process
  return *g_emu;
}

std::string dims(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
std::string dims(dim3 v) { return dims(uint3{v.x, v.y, v.z}); }
std::string where(Site s) { return std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line); }
bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || (a.file && b.file && std::strcmp(a.file, b.file) == 0));
}

std::string kernel_name(const Emulator& e) {
  return e.kernel != nullptr ? std::string(e.kernel) : "the kernel launched at " + where(e.cfg->where);
}

std::string thread_str(const Emulator& e, const Thread& t) {
  return "block " + dims(e.block_idx) + " thread " + dims(t.b.thread);
}

std::string describe_wait(const Thread& t) {
  switch (t.wait) {
    case Wait::kReady: return "is still running";
    case Wait::kBarrier: return "waits at __syncthreads at " + where(t.site);
    case Wait::kShuffle: return "waits at __shfl_xor_sync at " + where(t.site);
    case Wait::kDone: return "has exited";
  }
  return "?";
}

[[noreturn]] void fail_block(Emulator& e, const std::string& what) {
  throw Error("pyperf_emu: " + kernel_name(e) + ": block " + dims(e.block_idx) + ": " + what);
}

// ---- fibers ----

void fiber_entry();

void resume(Emulator& e, Thread& t) {
  t.started = true;
  e.running = &t;
  g_builtins = &t.b;
#if defined(PYPERF_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStack);
  context_switch(e.sched, t.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  context_switch(e.sched, t.ctx);
#endif
  e.running = nullptr;
  g_builtins = nullptr;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield(Emulator& e) {
  Thread& t = *e.running;
#if defined(PYPERF_EMU_ASAN)
  const bool final = t.wait == Wait::kDone;
  __sanitizer_start_switch_fiber(final ? nullptr : &t.fake_stack, e.sched_stack_bottom, e.sched_stack_size);
  context_switch(t.ctx, e.sched);
  __sanitizer_finish_switch_fiber(t.fake_stack, &e.sched_stack_bottom, &e.sched_stack_size);
#else
  context_switch(t.ctx, e.sched);
#endif
  if (e.unwinding) throw Unwind{};
}

void fiber_entry() {
  Emulator& e = *g_emu;
#if defined(PYPERF_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &e.sched_stack_bottom, &e.sched_stack_size);
#endif
  try {
    e.body(e.ctx);
  } catch (const Unwind&) {
    // the launch was abandoned; this fiber's frames are gone now
  }
  e.running->wait = Wait::kDone;
  yield(e);
  std::abort();  // a finished fiber is never resumed
}

// After an error: every fiber that started and has not finished is resumed once to unwind its stack.
void abandon(Emulator& e) {
  e.unwinding = true;
  for (int i = 0; i < e.nthreads; ++i) {
    Thread& t = e.threads[i];
    if (t.started && t.wait != Wait::kDone) resume(e, t);
  }
  e.unwinding = false;
}

// ---- shuffles and barriers ----

// Whether every lane named by t's mask waits at t's shuffle; if so, hands out the values and wakes them.
bool complete_shuffle(Emulator& e, Thread& t) {
  const int base = t.warp * 32;
  for (int l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    if (base + l >= e.nthreads) {
      fail_in_thread("__shfl_xor_sync at " + where(t.site) + ": mask 0x" + ([&] {
                       char b[16];
                       std::snprintf(b, sizeof b, "%08x", t.mask);
                       return std::string(b);
                     })() + " names lane " + std::to_string(l) + ", which does not exist (the block has " +
                     std::to_string(e.nthreads) + " threads)");
    }
    Thread& o = e.threads[base + l];
    if (o.wait == Wait::kDone) {
      fail_in_thread("__shfl_xor_sync at " + where(t.site) + ": its mask names lane " + std::to_string(l) +
                     ", which has exited");
    }
    if (o.wait == Wait::kShuffle && (!same_site(o.site, t.site) || o.mask != t.mask)) {
      fail_in_thread("divergent shuffles: this lane waits at __shfl_xor_sync at " + where(t.site) + ", lane " +
                     std::to_string(l) + " at " + where(o.site) + " (masks must name lanes at the same shuffle)");
    }
    if (o.wait != Wait::kShuffle) return false;
  }
  for (int l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    Thread& o = e.threads[base + l];
    if (!((t.mask >> o.src) & 1u)) {
      fail_in_thread("__shfl_xor_sync at " + where(t.site) + ": lane " + std::to_string(l) + " reads lane " +
                     std::to_string(o.src) + ", which its mask does not name (the value would be undefined)");
    }
    o.result = e.threads[base + o.src].value;
  }
  for (int l = 0; l < 32; ++l) {
    if ((t.mask >> l) & 1u) e.threads[base + l].wait = Wait::kReady;
  }
  return true;
}

// No thread can run: every live one waits at a barrier or a shuffle. Releases the barrier or reports why not.
void release_or_report(Emulator& e) {
  const Thread* at_barrier = nullptr;
  for (int i = 0; i < e.nthreads; ++i) {
    const Thread& t = e.threads[i];
    if (t.wait == Wait::kShuffle) {
      for (int l = 0; l < 32; ++l) {
        const int j = t.warp * 32 + l;
        if (((t.mask >> l) & 1u) && j < e.nthreads && e.threads[j].wait != Wait::kShuffle) {
          fail_block(e, "thread " + dims(t.b.thread) + " waits at __shfl_xor_sync at " + where(t.site) +
                            " for lane " + std::to_string(l) + ", which " + describe_wait(e.threads[j]) +
                            " (deadlock: a shuffle's lanes must all reach it)");
        }
      }
    }
    if (t.wait == Wait::kBarrier && at_barrier == nullptr) at_barrier = &t;
  }
  if (at_barrier == nullptr) fail_block(e, "no thread can run, none waits at a barrier (emulator bug)");
  int any = 0;
  for (int i = 0; i < e.nthreads; ++i) {
    const Thread& t = e.threads[i];
    if (t.wait != Wait::kBarrier || !same_site(t.site, at_barrier->site)) {
      fail_block(e, "divergent __syncthreads: thread " + dims(at_barrier->b.thread) + " waits at " +
                        where(at_barrier->site) + ", thread " + dims(t.b.thread) + " " + describe_wait(t) +
                        " (every thread of the block must reach the same barrier)");
    }
    any |= t.pred != 0;
  }
  for (int i = 0; i < e.nthreads; ++i) {
    e.threads[i].pred_result = any;
    e.threads[i].wait = Wait::kReady;
  }
}

// ---- blocks ----

void reset_shared(Emulator& e) {
#if defined(PYPERF_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(e.arena, e.arena_dirty);
#endif
  std::memset(e.arena, 0xff, e.arena_dirty);  // the poison pattern: unwritten floats read as NaN
#if defined(PYPERF_EMU_ASAN)
  ASAN_POISON_MEMORY_REGION(e.arena, kArena);
#endif
  e.arena_cursor = e.shared_bytes = e.arena_dirty = 0;
  e.shared_vars.clear();
}

void run_threads(Emulator& e);

void run_block(Emulator& e, uint3 bidx) {
  const LaunchConfig& c = *e.cfg;
  e.block_idx = bidx;
  reset_shared(e);
  for (int i = 0; i < e.nthreads; ++i) {
    Thread& t = e.threads[i];
    t.b.thread = uint3{i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y)};
    t.b.block = bidx;
    t.b.block_dim = c.block;
    t.b.grid_dim = c.grid;
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.wait = Wait::kReady;
    t.started = false;
    t.fake_stack = nullptr;
    t.stack = e.stacks + static_cast<size_t>(i) * kStack;
#if defined(PYPERF_EMU_ASAN)
    // an earlier block may have left poisoned frames here (a launch abandoned after an error)
    ASAN_UNPOISON_MEMORY_REGION(t.stack + 4096, kStack - 4096);
#endif
    context_make(t.ctx, t.stack + 4096, kStack - 4096, &fiber_entry);
  }
  try {
    run_threads(e);
  } catch (const Error&) {
    abandon(e);
    throw;
  }
}

void run_threads(Emulator& e) {
  int done = 0;
  while (done < e.nthreads) {
    bool ran = false;
    for (int i = 0; i < e.nthreads; ++i) {
      Thread& t = e.threads[i];
      if (t.wait != Wait::kReady) continue;
      resume(e, t);
      ran = true;
      if (!e.error.empty()) throw Error(e.error);
      if (t.wait == Wait::kDone) ++done;
    }
    if (done == e.nthreads) break;
    if (!ran) {
      if (done > 0) {
        for (int i = 0; i < e.nthreads; ++i) {
          const Thread& t = e.threads[i];
          if (t.wait == Wait::kBarrier) {
            const Thread* gone = nullptr;
            for (int j = 0; j < e.nthreads && gone == nullptr; ++j)
              if (e.threads[j].wait == Wait::kDone) gone = &e.threads[j];
            fail_block(e, "divergent __syncthreads: thread " + dims(t.b.thread) + " waits at " + where(t.site) +
                              ", thread " + dims(gone->b.thread) +
                              " exited without reaching it (every thread of the block must reach it)");
          }
        }
      }
      release_or_report(e);
    }
  }
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t base_seed() {
  static const uint64_t seed = [] {
    const char* s = std::getenv("PYPERF_EMU_SEED");
    return s != nullptr ? std::strtoull(s, nullptr, 0) : 0x5eedull;
  }();
  return seed;
}

void check_config(const LaunchConfig& c) {
  auto bad = [&](const std::string& what) { throw Error("pyperf_emu: launch at " + where(c.where) + ": " + what); };
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) bad("empty grid " + dims(c.grid) + " (invalid configuration)");
  if (threads == 0) bad("empty block " + dims(c.block) + " (invalid configuration)");
  if (c.grid.x > kMaxGridX) bad("gridDim.x = " + std::to_string(c.grid.x) + " > 2^31-1");
  if (c.grid.y > kMaxGridYZ) bad("gridDim.y = " + std::to_string(c.grid.y) + " > 65535");
  if (c.grid.z > kMaxGridYZ) bad("gridDim.z = " + std::to_string(c.grid.z) + " > 65535");
  if (threads > kMaxThreads) bad(std::to_string(threads) + " threads per block > 1024");
  if (c.block.z > 64) bad("blockDim.z = " + std::to_string(c.block.z) + " > 64");
  if (c.param_bytes > kMaxParams) bad(std::to_string(c.param_bytes) + " bytes of kernel parameters > 4 KiB");
}

}  // namespace

// ---- device-side entry points ----

[[noreturn]] void fail_in_thread(const std::string& what) {
  Emulator& e = emu();
  if (e.running == nullptr) throw Error("pyperf_emu: " + what);
  e.error = "pyperf_emu: " + kernel_name(e) + ": " + thread_str(e, *e.running) + ": " + what;
  throw Unwind{};  // to fiber_entry, which finishes this fiber; the scheduler then abandons the launch
}

// PYPERF_EMU_COVERAGE=FILE: every kernel instantiation that ran, one per line, appended to FILE at exit (which
// kernels the tests reach; compare with what ptxas compiled: scripts/cuda_resources.py).
namespace {
struct Coverage {
  std::mutex mu;
  std::set<std::string> seen;
  ~Coverage() {
    const char* path = std::getenv("PYPERF_EMU_COVERAGE");
    if (path == nullptr || seen.empty()) return;
    if (FILE* f = std::fopen(path, "a")) {
      for (const std::string& k : seen) std::fprintf(f, "%s\n", k.c_str());
      std::fclose(f);
    }
  }
};
Coverage g_coverage;
}  // namespace

void kernel_entry(long long max_threads, const char* kernel) {
  Emulator& e = emu();
  if (e.kernel == nullptr) {
    e.kernel = kernel;
    if (std::getenv("PYPERF_EMU_COVERAGE") != nullptr) {
      std::lock_guard<std::mutex> lock(g_coverage.mu);
      g_coverage.seen.insert(kernel);
    }
  }
  const long long threads = e.nthreads;
  if (max_threads > 0 && threads > max_threads) {
    fail_in_thread("launched with " + std::to_string(threads) + " threads per block, more than its __launch_bounds__(" +
                   std::to_string(max_threads) + ")");
  }
}

int barrier(bool or_reduce, int pred, Site site) {
  Emulator& e = emu();
  Thread& t = *e.running;
  t.wait = Wait::kBarrier;
  t.site = site;
  t.or_reduce = or_reduce;
  t.pred = pred;
  yield(e);
  return t.pred_result;
}

uint64_t shuffle_xor(unsigned mask, uint64_t value, int lane_mask, int width, Site site) {
  Emulator& e = emu();
  Thread& t = *e.running;
  if (width != 32) fail_in_thread("__shfl_xor_sync at " + where(site) + ": width " + std::to_string(width) +
                                  " is not emulated (only 32)");
  if (!((mask >> t.lane) & 1u)) {
    fail_in_thread("__shfl_xor_sync at " + where(site) + ": the calling lane " + std::to_string(t.lane) +
                   " is not in its mask");
  }
  if (lane_mask < 0 || lane_mask > 31) fail_in_thread("__shfl_xor_sync: lane mask " + std::to_string(lane_mask) +
                                                      " outside [0, 31]");
  t.wait = Wait::kShuffle;
  t.site = site;
  t.mask = mask;
  t.value = value;
  t.src = t.lane ^ lane_mask;
  if (!complete_shuffle(e, t)) yield(e);
  return t.result;
}

void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name) {
  Emulator& e = emu();
  for (const SharedVar& v : e.shared_vars)
    if (v.key == key) return v.ptr;
  if (e.shared_bytes + bytes > kMaxStaticShared) {
    fail_in_thread("__shared__ " + std::string(name) + " (" + std::to_string(bytes) + " bytes) brings the block's "
                   "static shared memory to " + std::to_string(e.shared_bytes + bytes) + " bytes, more than 48 KiB");
  }
  const size_t a = align < 16 ? 16 : align;
  const size_t off = (e.arena_cursor + a - 1) / a * a;
  if (off + bytes + kRedzone > kArena) fail_in_thread("__shared__ arena exhausted (emulator limit)");
  void* p = e.arena + off;
#if defined(PYPERF_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#endif
  e.arena_cursor = off + bytes + kRedzone;
  e.arena_dirty = e.arena_cursor;
  e.shared_bytes += bytes;
  e.shared_vars.push_back(SharedVar{key, p});
  return p;
}

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  check_config(cfg);
  Emulator& e = emu();
  if (e.cfg != nullptr) throw Error("pyperf_emu: a kernel launched another kernel (not emulated)");
  e.cfg = &cfg;
  e.body = body;
  e.ctx = ctx;
  e.kernel = nullptr;
  e.error.clear();
  e.nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  struct Reset {
    Emulator& e;
    ~Reset() {
      e.cfg = nullptr;
      e.running = nullptr;
      g_builtins = nullptr;
    }
  } reset{e};
  // The blocks in a shuffled order (Fisher-Yates from splitmix64 of the seed and the launch number).
  const uint64_t n = 1ull * cfg.grid.x * cfg.grid.y * cfg.grid.z;
  std::vector<uint64_t> order(n);
  for (uint64_t i = 0; i < n; ++i) order[i] = i;
  uint64_t s = base_seed() ^ (0x9E3779B97F4A7C15ull * ++e.launches);
  for (uint64_t i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix(s) % i]);
  for (uint64_t k : order) {
    const uint3 b{static_cast<unsigned>(k % cfg.grid.x), static_cast<unsigned>((k / cfg.grid.x) % cfg.grid.y),
                  static_cast<unsigned>(k / (1ull * cfg.grid.x * cfg.grid.y))};
    run_block(e, b);
  }
}

}  // namespace pyperf_emu
