// Execution model of the MSL harness: one fiber per GPU thread, threadgroups run one at a time,
// barriers and simdgroup collectives are rendezvous points, every buffer sits between
// PROT_NONE guard pages so that an out-of-bounds access faults and is reported by name.
//
// Everything a kernel thread can observe about scheduling is decided here; msl_shim.h builds
// the MSL language subset on top of the rendezvous primitives below.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <source_location>
#include <type_traits>
#include <utility>
#include <vector>

namespace mslh {

constexpr int kSimdWidth = 32;             // Apple GPUs: 32 lanes per simdgroup
constexpr size_t kMaxThreadgroupMemory = 32768;  // MTLDevice.maxThreadgroupMemoryLength on Apple silicon
constexpr int kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kSlotBytes = 64;          // largest value one lane can pass through a collective
constexpr size_t kFiberStack = 256 * 1024;
constexpr size_t kGuard = size_t(256) << 20;  // PROT_NONE reservation on each side of a region

// ---------------------------------------------------------------------------------------------
// Error reporting: one line per error on stderr, prefixed so the Python driver can find it.
// ---------------------------------------------------------------------------------------------
enum Exit { kExitKernelError = 70, kExitFault = 71, kExitUsage = 72 };

inline const char* g_kernel_name = "?";

struct Site {
  const char* file = "";
  unsigned line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};
inline Site site_of(const std::source_location& l) { return Site{l.file_name(), l.line()}; }

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------------------------
// Guarded memory regions (buffers, threadgroup arrays, fiber stacks).
// ---------------------------------------------------------------------------------------------
enum class RegionKind { kBuffer, kThreadgroup, kStack };

struct Region {
  RegionKind kind;
  char name[96];
  char type[48];
  size_t elem_size;
  size_t nbytes;
  uintptr_t reserve_lo, reserve_hi;  // whole reservation, guards included
  uintptr_t data;                    // first byte of the usable bytes
};

inline std::vector<Region>& regions() {
  static std::vector<Region> r;
  return r;
}

inline size_t page_size() {
  static size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// Reserve [guard | data pages | guard]; place the data flush against the upper guard
// (end_aligned: an overrun by even one byte faults) or against the lower one (an underrun faults).
inline void* guarded_alloc(RegionKind kind, const char* name, const char* type, size_t elem_size,
                           size_t nbytes, bool end_aligned, size_t guard = kGuard) {
  size_t pg = page_size();
  size_t span = (nbytes + pg - 1) / pg * pg;
  size_t total = guard + span + guard;
  void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) fail("harness: cannot reserve %zu bytes for '%s'", total, name);
  uintptr_t lo = reinterpret_cast<uintptr_t>(base);
  if (span && mprotect(reinterpret_cast<void*>(lo + guard), span, PROT_READ | PROT_WRITE) != 0)
    fail("harness: mprotect failed for '%s'", name);
  uintptr_t data = end_aligned ? lo + guard + span - nbytes : lo + guard;
  Region r{};
  r.kind = kind;
  std::snprintf(r.name, sizeof r.name, "%s", name);
  std::snprintf(r.type, sizeof r.type, "%s", type);
  r.elem_size = elem_size ? elem_size : 1;
  r.nbytes = nbytes;
  r.reserve_lo = lo;
  r.reserve_hi = lo + total;
  r.data = data;
  regions().push_back(r);
  return reinterpret_cast<void*>(data);
}

// ---------------------------------------------------------------------------------------------
// Threads, simdgroups, threadgroups.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct V3 {
  T x, y, z;
};

enum class State { kReady, kBarrier, kSimd, kDone };
enum class Op : int {
  kNone, kBarrier, kSimdBarrier, kSum, kProd, kMin, kMax, kAnd, kOr, kXor, kAll, kAny,
  kBroadcast, kBroadcastFirst, kShuffle, kShuffleDown, kShuffleUp, kShuffleXor,
  kPrefixInclusiveSum, kPrefixExclusiveSum, kMatLoad, kMatStore, kMatMul
};

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kNone: return "none";
    case Op::kBarrier: return "threadgroup_barrier";
    case Op::kSimdBarrier: return "simdgroup_barrier";
    case Op::kSum: return "simd_sum";
    case Op::kProd: return "simd_product";
    case Op::kMin: return "simd_min";
    case Op::kMax: return "simd_max";
    case Op::kAnd: return "simd_and";
    case Op::kOr: return "simd_or";
    case Op::kXor: return "simd_xor";
    case Op::kAll: return "simd_all";
    case Op::kAny: return "simd_any";
    case Op::kBroadcast: return "simd_broadcast";
    case Op::kBroadcastFirst: return "simd_broadcast_first";
    case Op::kShuffle: return "simd_shuffle";
    case Op::kShuffleDown: return "simd_shuffle_down";
    case Op::kShuffleUp: return "simd_shuffle_up";
    case Op::kShuffleXor: return "simd_shuffle_xor";
    case Op::kPrefixInclusiveSum: return "simd_prefix_inclusive_sum";
    case Op::kPrefixExclusiveSum: return "simd_prefix_exclusive_sum";
    case Op::kMatLoad: return "simdgroup_load";
    case Op::kMatStore: return "simdgroup_store";
    case Op::kMatMul: return "simdgroup_multiply(_accumulate)";
  }
  return "?";
}

// The values of every [[attribute]] MLX may pass, for one thread.
struct ThreadAttrs {
  V3<uint32_t> thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threadgroups_per_grid, threads_per_grid,
      threads_per_threadgroup, dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup,
      thread_index_in_simdgroup, simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
      quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup,
      dispatch_quadgroups_per_threadgroup, thread_execution_width, threads_per_simdgroup;
};

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  State state = State::kDone;
  ThreadAttrs attrs;
  Site wait_site;
  Op wait_op = Op::kNone;
};

struct SimdGroup {
  int nlanes = 0;         // lanes that exist (the last simdgroup of a threadgroup may be partial)
  int alive = 0;          // lanes that have not returned
  int arrived = 0;        // lanes waiting at the pending collective
  uint64_t round = 0;     // completed collectives; selects the slot buffer
  Op op = Op::kNone;
  Site site;
  bool need_full = false;
  uint32_t mask[2] = {0, 0};                        // lanes that took part, per slot buffer
  alignas(16) unsigned char slots[2][kSimdWidth][kSlotBytes];
  alignas(16) unsigned char results[2][kSimdWidth][kSlotBytes];
  // Completion of the pending collective, run once by whichever lane completes it.
  void (*complete)(SimdGroup&, int buf) = nullptr;
};

struct Launch {
  V3<uint32_t> grid, group;  // grid in threads; group = dispatch threadgroup size
  int schedule = 0;          // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  unsigned char poison = 0xFF;
};

struct Runtime {
  Launch launch;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simdgroups;
  ucontext_t sched_ctx;
  Fiber* cur = nullptr;
  int nthreads = 0;
  int finished = 0;
  int barrier_arrived = 0;
  Site barrier_site;
  uint64_t tg_epoch = 0;
  const char* active_op = nullptr;  // set while one lane completes a collective for all lanes
  void (*invoke)(const ThreadAttrs&) = nullptr;
  // threadgroup arrays: one guarded region per declaration site, re-poisoned per threadgroup
  struct TgSite {
    void* data = nullptr;
    size_t nbytes = 0;
    uint64_t epoch = 0;
  };
  std::vector<TgSite> tg_sites;
  size_t tg_bytes = 0;
  std::mt19937_64 rng;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void describe_thread(char* out, size_t n, const Fiber* f) {
  if (!f) {
    std::snprintf(out, n, "outside any kernel thread");
    return;
  }
  const ThreadAttrs& a = f->attrs;
  std::snprintf(out, n,
                "thread_position_in_grid=(%u,%u,%u), threadgroup_position_in_grid=(%u,%u,%u), "
                "simdgroup %u lane %u",
                a.thread_position_in_grid.x, a.thread_position_in_grid.y,
                a.thread_position_in_grid.z, a.threadgroup_position_in_grid.x,
                a.threadgroup_position_in_grid.y, a.threadgroup_position_in_grid.z,
                a.simdgroup_index_in_threadgroup, a.thread_index_in_simdgroup);
}

inline void fail(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char who[256];
  describe_thread(who, sizeof who, rt().cur);
  std::fprintf(stderr, "MSLH-ERROR: kernel %s: %s [%s]\n", g_kernel_name, msg, who);
  std::fflush(stderr);
  _exit(kExitKernelError);
}

// ---------------------------------------------------------------------------------------------
// Fault handler: turn a guard-page hit into a report naming kernel, buffer and element index.
// ---------------------------------------------------------------------------------------------
inline void on_fault(int sig, siginfo_t* info, void* uctx) {
  uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const char* access = "access";
#if defined(__x86_64__) && defined(__linux__)
  auto* uc = static_cast<ucontext_t*>(uctx);
  access = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
#else
  (void)uctx;
#endif
  char who[256];
  describe_thread(who, sizeof who, rt().cur);
  char msg[1024];
  const Region* hit = nullptr;
  for (const Region& r : regions())
    if (addr >= r.reserve_lo && addr < r.reserve_hi) hit = &r;
  if (hit && hit->kind == RegionKind::kStack) {
    std::snprintf(msg, sizeof msg,
                  "stack overflow of a kernel thread (the harness gives each thread %zu KiB)",
                  kFiberStack / 1024);
  } else if (hit) {
    long long off = static_cast<long long>(addr) - static_cast<long long>(hit->data);
    long long idx = off >= 0 ? off / (long long)hit->elem_size
                             : -((-off + (long long)hit->elem_size - 1) / (long long)hit->elem_size);
    std::snprintf(msg, sizeof msg,
                  "out-of-bounds %s of %s '%s' (%s, %zu elements) at element index %lld "
                  "(byte offset %lld)",
                  access, hit->kind == RegionKind::kBuffer ? "buffer" : "threadgroup array",
                  hit->name, hit->type, hit->nbytes / hit->elem_size, idx, off);
  } else if (sig == SIGSEGV && info->si_code == SI_KERNEL) {
    std::snprintf(msg, sizeof msg, "general protection fault (misaligned vector access?)");
  } else {
    std::snprintf(msg, sizeof msg,
                  "invalid memory %s at address %p: not inside any kernel buffer (wild pointer)",
                  access, info->si_addr);
  }
  const char* op = rt().active_op;
  std::fprintf(stderr, "MSLH-ERROR: kernel %s: %s%s%s [%s]\n", g_kernel_name, msg,
               op ? " during " : "", op ? op : "", who);
  std::fflush(stderr);
  _exit(kExitFault);
}

inline void install_fault_handler() {
  static std::vector<char> altstack(1 << 16);
  stack_t ss{};
  ss.ss_sp = altstack.data();
  ss.ss_size = altstack.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  struct sigaction fpe{};
  fpe.sa_handler = [](int) {
    char who[256];
    describe_thread(who, sizeof who, rt().cur);
    std::fprintf(stderr, "MSLH-ERROR: kernel %s: integer division by zero [%s]\n", g_kernel_name,
                 who);
    std::fflush(stderr);
    _exit(kExitFault);
  };
  fpe.sa_flags = SA_ONSTACK;
  sigemptyset(&fpe.sa_mask);
  sigaction(SIGFPE, &fpe, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Rendezvous primitives.
// ---------------------------------------------------------------------------------------------
inline Fiber& self() {
  if (!rt().cur) fail("MSL builtin called outside a kernel thread");
  return *rt().cur;
}

inline void yield_to_scheduler() {
  Fiber& f = *rt().cur;
  swapcontext(&f.ctx, &rt().sched_ctx);
}

inline SimdGroup& my_simdgroup() { return rt().simdgroups[self().attrs.simdgroup_index_in_threadgroup]; }

inline SimdGroup& my_simdgroup_of(const Fiber& f) {
  return rt().simdgroups[f.attrs.simdgroup_index_in_threadgroup];
}

inline void finish_collective(SimdGroup& g) {
  int buf = int(g.round & 1);
  if (g.need_full && g.arrived != kSimdWidth)
    fail("%s (%s:%u) reached with only %d of 32 lanes live (other lanes returned early)",
         op_name(g.op), g.site.file, g.site.line, g.arrived);
  if (g.complete) {
    rt().active_op = op_name(g.op);
    g.complete(g, buf);
    rt().active_op = nullptr;
  }
  g.arrived = 0;
  g.round++;
  g.op = Op::kNone;
  for (Fiber& f : rt().fibers)
    if (f.state == State::kSimd && &my_simdgroup_of(f) == &g) f.state = State::kReady;
}

// Lane side of a simdgroup collective: deposit `n` bytes, wait until every live lane of the
// simdgroup has arrived at the same call, then return the slot buffer of that round (all lanes'
// deposits, plus per-lane results written by `complete`). Lanes that already returned from the
// kernel are inactive, as on the GPU; `need_full` ops require all 32 lanes.
inline int simd_rendezvous(Op op, Site site, const void* payload, size_t n,
                           void (*complete)(SimdGroup&, int), bool need_full) {
  Fiber& f = self();
  SimdGroup& g = my_simdgroup();
  if (need_full && g.nlanes != kSimdWidth)
    fail("%s (%s:%u) needs a full simdgroup of 32 threads; this simdgroup has %d "
         "(threadgroup size not a multiple of 32?)",
         op_name(op), site.file, site.line, g.nlanes);
  if (g.arrived == 0) {
    g.op = op;
    g.site = site;
    g.complete = complete;
    g.need_full = need_full;
    g.mask[g.round & 1] = 0;
  } else if (g.op != op || !(g.site == site)) {
    fail("divergent simdgroup: lanes wait at %s (%s:%u) and %s (%s:%u); the harness runs "
         "simdgroup functions only where all live lanes of a simdgroup call them together",
         op_name(g.op), g.site.file, g.site.line, op_name(op), site.file, site.line);
  }
  int buf = int(g.round & 1);
  uint32_t lane = f.attrs.thread_index_in_simdgroup;
  if (n > kSlotBytes) fail("harness: collective payload of %zu bytes is too large", n);
  if (n) std::memcpy(g.slots[buf][lane], payload, n);
  g.mask[buf] |= 1u << lane;
  g.arrived++;
  f.wait_site = site;
  f.wait_op = op;
  if (g.arrived == g.alive) {
    finish_collective(g);
  } else {
    f.state = State::kSimd;
    yield_to_scheduler();
  }
  f.wait_op = Op::kNone;
  return buf;
}

inline void threadgroup_rendezvous(Site site) {
  Runtime& r = rt();
  Fiber& f = self();
  if (r.finished > 0)
    fail("threadgroup_barrier (%s:%u) reached after other threads of the threadgroup returned; "
         "every thread of a threadgroup must reach each barrier",
         site.file, site.line);
  if (r.barrier_arrived == 0) {
    r.barrier_site = site;
  } else if (!(r.barrier_site == site)) {
    fail("threads of one threadgroup wait at different threadgroup_barrier calls (%s:%u and "
         "%s:%u)",
         r.barrier_site.file, r.barrier_site.line, site.file, site.line);
  }
  r.barrier_arrived++;
  f.wait_site = site;
  f.wait_op = Op::kBarrier;
  if (r.barrier_arrived == r.nthreads) {
    r.barrier_arrived = 0;
    for (Fiber& o : r.fibers)
      if (o.state == State::kBarrier) o.state = State::kReady;
  } else {
    f.state = State::kBarrier;
    yield_to_scheduler();
  }
  f.wait_op = Op::kNone;
}

// Threadgroup arrays: the translator rewrites `threadgroup T name[N];` in the kernel body into
// a call to this with a per-declaration site id. All threads of a threadgroup get the same
// storage, poisoned when the threadgroup starts using it.
template <typename T>
T& threadgroup_array(int site_id, const char* name, const char* type) {
  Runtime& r = rt();
  if (site_id >= int(r.tg_sites.size())) r.tg_sites.resize(site_id + 1);
  Runtime::TgSite& s = r.tg_sites[site_id];
  if (!s.data) {
    r.tg_bytes += sizeof(T);
    if (r.tg_bytes > kMaxThreadgroupMemory)
      fail("threadgroup memory of %zu bytes exceeds the 32 KiB that Apple GPUs provide "
           "(while declaring '%s')",
           r.tg_bytes, name);
    using E = std::remove_all_extents_t<T>;
    s.data = guarded_alloc(RegionKind::kThreadgroup, name, type, sizeof(E), sizeof(T),
                           r.launch.schedule != 1);
    s.nbytes = sizeof(T);
  }
  if (s.epoch != r.tg_epoch) {
    std::memset(s.data, r.launch.poison, s.nbytes);
    s.epoch = r.tg_epoch;
  }
  return *static_cast<T*>(s.data);
}

// ---------------------------------------------------------------------------------------------
// Scheduler.
// ---------------------------------------------------------------------------------------------
inline void fiber_main() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  r.invoke(f.attrs);
  // The thread returned from the kernel.
  f.state = State::kDone;
  r.finished++;
  if (r.barrier_arrived > 0)
    fail("thread returned while other threads of its threadgroup wait at threadgroup_barrier "
         "(%s:%u); every thread of a threadgroup must reach each barrier",
         r.barrier_site.file, r.barrier_site.line);
  SimdGroup& g = my_simdgroup_of(f);
  g.alive--;
  if (g.arrived > 0 && g.arrived == g.alive) finish_collective(g);
  r.cur = nullptr;
  setcontext(&r.sched_ctx);
}

[[noreturn]] inline void report_deadlock() {
  Runtime& r = rt();
  char msg[1024];
  int n = std::snprintf(msg, sizeof msg, "threads of a threadgroup can make no progress:");
  int shown = 0;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::kDone || f.state == State::kReady) continue;
    if (shown++ == 6) break;
    n += std::snprintf(msg + n, sizeof msg - n, " [simdgroup %u lane %u waits at %s %s:%u]",
                       f.attrs.simdgroup_index_in_threadgroup, f.attrs.thread_index_in_simdgroup,
                       op_name(f.wait_op), f.wait_site.file, f.wait_site.line);
    if (n >= int(sizeof msg)) break;
  }
  r.cur = nullptr;
  fail("%s; a simdgroup function or barrier is called in divergent control flow", msg);
}

inline void run_threadgroup(V3<uint32_t> tgpos) {
  Runtime& r = rt();
  const Launch& L = r.launch;
  V3<uint32_t> ntg{(L.grid.x + L.group.x - 1) / L.group.x, (L.grid.y + L.group.y - 1) / L.group.y,
                   (L.grid.z + L.group.z - 1) / L.group.z};
  // dispatchThreads: threadgroups at the upper edges of the grid are smaller.
  V3<uint32_t> size{std::min(L.group.x, L.grid.x - tgpos.x * L.group.x),
                    std::min(L.group.y, L.grid.y - tgpos.y * L.group.y),
                    std::min(L.group.z, L.grid.z - tgpos.z * L.group.z)};
  int n = int(size.x * size.y * size.z);
  int dispatch_n = int(L.group.x * L.group.y * L.group.z);
  r.nthreads = n;
  r.finished = 0;
  r.barrier_arrived = 0;
  r.tg_epoch++;
  int nsg = (n + kSimdWidth - 1) / kSimdWidth;
  r.simdgroups.assign(nsg, SimdGroup{});
  for (int s = 0; s < nsg; ++s) {
    int lanes = std::min(kSimdWidth, n - s * kSimdWidth);
    r.simdgroups[s].nlanes = lanes;
    r.simdgroups[s].alive = lanes;
  }
  for (int i = 0; i < n; ++i) {
    uint32_t lx = uint32_t(i) % size.x, ly = (uint32_t(i) / size.x) % size.y,
             lz = uint32_t(i) / (size.x * size.y);
    Fiber& f = r.fibers[i];
    ThreadAttrs& a = f.attrs;
    a.thread_position_in_threadgroup = {lx, ly, lz};
    a.threadgroup_position_in_grid = tgpos;
    a.thread_position_in_grid = {tgpos.x * L.group.x + lx, tgpos.y * L.group.y + ly,
                                 tgpos.z * L.group.z + lz};
    a.threadgroups_per_grid = ntg;
    a.threads_per_grid = L.grid;
    a.grid_size = L.grid;
    a.grid_origin = {0, 0, 0};
    a.threads_per_threadgroup = size;
    a.dispatch_threads_per_threadgroup = L.group;
    a.thread_index_in_threadgroup = uint32_t(i);
    a.simdgroup_index_in_threadgroup = uint32_t(i / kSimdWidth);
    a.thread_index_in_simdgroup = uint32_t(i % kSimdWidth);
    a.simdgroups_per_threadgroup = uint32_t(nsg);
    a.dispatch_simdgroups_per_threadgroup = uint32_t((dispatch_n + kSimdWidth - 1) / kSimdWidth);
    a.quadgroup_index_in_threadgroup = uint32_t(i / 4);
    a.thread_index_in_quadgroup = uint32_t(i % 4);
    a.quadgroups_per_threadgroup = uint32_t((n + 3) / 4);
    a.dispatch_quadgroups_per_threadgroup = uint32_t((dispatch_n + 3) / 4);
    a.thread_execution_width = kSimdWidth;
    a.threads_per_simdgroup = kSimdWidth;
    f.state = State::kReady;
    f.wait_op = Op::kNone;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = L.schedule == 1 ? n - 1 - i : i;
  while (r.finished < n) {
    if (L.schedule == 2) std::shuffle(order.begin(), order.end(), r.rng);
    bool progress = false;
    for (int i : order) {
      Fiber& f = r.fibers[i];
      if (f.state != State::kReady) continue;
      progress = true;
      r.cur = &f;
      swapcontext(&r.sched_ctx, &f.ctx);
      r.cur = nullptr;
    }
    if (!progress) report_deadlock();
  }
}

// Run the whole grid; threadgroups in the order of the schedule.
inline void run_grid(void (*invoke)(const ThreadAttrs&)) {
  Runtime& r = rt();
  const Launch& L = r.launch;
  r.invoke = invoke;
  r.rng.seed(L.seed);
  uint64_t tg_threads = uint64_t(L.group.x) * L.group.y * L.group.z;
  if (L.grid.x == 0 || L.grid.y == 0 || L.grid.z == 0 || tg_threads == 0)
    fail("empty grid (%u,%u,%u) or threadgroup (%u,%u,%u)", L.grid.x, L.grid.y, L.grid.z,
         L.group.x, L.group.y, L.group.z);
  if (tg_threads > uint64_t(kMaxThreadsPerThreadgroup))
    fail("threadgroup of %" PRIu64 " threads exceeds the maximum of %d", tg_threads,
         kMaxThreadsPerThreadgroup);
  V3<uint32_t> ntg{(L.grid.x + L.group.x - 1) / L.group.x, (L.grid.y + L.group.y - 1) / L.group.y,
                   (L.grid.z + L.group.z - 1) / L.group.z};
  // With a partial edge threadgroup that is more than one row tall, MSL does not define how
  // thread_index_in_threadgroup (and so simdgroup membership) is laid out: refuse, don't guess.
  if (L.grid.x % L.group.x != 0 && L.group.y * L.group.z > 1)
    fail("grid.x (%u) is not a multiple of threadgroup.x (%u) while the threadgroup has several "
         "rows: the linear thread order of such partial threadgroups is unspecified",
         L.grid.x, L.group.x);
  r.fibers.assign(size_t(tg_threads), Fiber{});
  for (size_t i = 0; i < r.fibers.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "stack%zu", i);
    r.fibers[i].stack =
        guarded_alloc(RegionKind::kStack, name, "stack", 1, kFiberStack, false, 16 * page_size());
  }
  std::vector<V3<uint32_t>> tgs;
  for (uint32_t z = 0; z < ntg.z; ++z)
    for (uint32_t y = 0; y < ntg.y; ++y)
      for (uint32_t x = 0; x < ntg.x; ++x) tgs.push_back({x, y, z});
  if (L.schedule == 1) std::reverse(tgs.begin(), tgs.end());
  if (L.schedule == 2) std::shuffle(tgs.begin(), tgs.end(), r.rng);
  for (const auto& t : tgs) run_threadgroup(t);
}

// ---------------------------------------------------------------------------------------------
// Process entry: `binary IO_DIR SCHEDULE SEED`. IO_DIR/launch.txt gives the grid, the dispatch
// threadgroup size and one line per kernel buffer: `buffer INDEX NBYTES INIT` where INIT is
// `file` (read IO_DIR/inINDEX.bin), `poison`, or the hex bytes of one element to fill with.
// Outputs are written to IO_DIR/outINDEX.rSCHEDULE.bin.
// ---------------------------------------------------------------------------------------------
struct BufferSpec {
  const char* name;
  const char* type;
  size_t elem_size;
  bool output;
};

inline std::vector<unsigned char> read_file(const char* path) {
  std::vector<unsigned char> data;
  FILE* f = std::fopen(path, "rb");
  if (!f) fail("harness: cannot open %s", path);
  unsigned char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) data.insert(data.end(), chunk, chunk + n);
  std::fclose(f);
  return data;
}

inline int run_main(int argc, char** argv, const char* kernel, const BufferSpec* specs, int nbuf,
                    void** bufs, void (*invoke)(const ThreadAttrs&)) {
  g_kernel_name = kernel;
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IO_DIR SCHEDULE SEED\n", argv[0]);
    return kExitUsage;
  }
  install_fault_handler();
  Runtime& r = rt();
  const char* dir = argv[1];
  r.launch.schedule = std::atoi(argv[2]);
  r.launch.seed = std::strtoull(argv[3], nullptr, 10);
  static const unsigned char kPoison[3] = {0xFF, 0x7F, 0xFE};
  r.launch.poison = kPoison[r.launch.schedule % 3];
  bool end_aligned = r.launch.schedule != 1;
  char path[4096];
  std::snprintf(path, sizeof path, "%s/launch.txt", dir);
  FILE* f = std::fopen(path, "r");
  if (!f) fail("harness: cannot open %s", path);
  if (std::fscanf(f, " grid %u %u %u", &r.launch.grid.x, &r.launch.grid.y, &r.launch.grid.z) != 3 ||
      std::fscanf(f, " group %u %u %u", &r.launch.group.x, &r.launch.group.y, &r.launch.group.z) != 3)
    fail("harness: bad launch.txt");
  std::vector<size_t> sizes(nbuf);
  for (int k = 0; k < nbuf; ++k) {
    int i;
    size_t nbytes;
    char init[256];
    if (std::fscanf(f, " buffer %d %zu %255s", &i, &nbytes, init) != 3 || i != k)
      fail("harness: bad buffer line %d in launch.txt", k);
    const BufferSpec& s = specs[i];
    sizes[i] = nbytes;
    unsigned char* data = static_cast<unsigned char*>(
        guarded_alloc(RegionKind::kBuffer, s.name, s.type, s.elem_size, nbytes, end_aligned));
    bufs[i] = data;
    if (std::strcmp(init, "file") == 0) {
      std::snprintf(path, sizeof path, "%s/in%d.bin", dir, i);
      std::vector<unsigned char> bytes = read_file(path);
      if (bytes.size() != nbytes) fail("harness: %s has %zu bytes, expected %zu", path, bytes.size(), nbytes);
      if (nbytes) std::memcpy(data, bytes.data(), nbytes);
    } else if (std::strcmp(init, "poison") == 0) {
      std::memset(data, r.launch.poison, nbytes);
    } else {
      size_t len = std::strlen(init) / 2;
      if (len != s.elem_size) fail("harness: init value of buffer %d has %zu bytes", i, len);
      unsigned char elem[16];
      for (size_t b = 0; b < len; ++b) std::sscanf(init + 2 * b, "%2hhx", &elem[b]);
      for (size_t o = 0; o + len <= nbytes; o += len) std::memcpy(data + o, elem, len);
    }
  }
  std::fclose(f);
  run_grid(invoke);
  for (int i = 0; i < nbuf; ++i) {
    if (!specs[i].output) continue;
    std::snprintf(path, sizeof path, "%s/out%d.r%d.bin", dir, i, r.launch.schedule);
    FILE* o = std::fopen(path, "wb");
    if (!o || std::fwrite(bufs[i], 1, sizes[i], o) != sizes[i]) fail("harness: cannot write %s", path);
    std::fclose(o);
  }
  return 0;
}

}  // namespace mslh
