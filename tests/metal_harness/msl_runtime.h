// Execution model of the MSL harness: one fiber per GPU thread, threadgroups run one at a time,
// barriers and simdgroup collectives are rendezvous points, every buffer sits between
// PROT_NONE guard pages so that an out-of-bounds access faults and is reported by name.
//
// Everything a kernel thread can observe about scheduling is decided here; msl_shim.h builds
// the MSL language subset on top of the rendezvous primitives below. The definitions are in
// msl_runtime.cpp, compiled once and linked into every kernel binary.
#pragma once

#include <ucontext.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <source_location>
#include <type_traits>
#include <vector>

// Switching between kernel threads. glibc's swapcontext makes two signal-mask system calls per
// switch, which dominated run time; on x86-64 Linux a minimal switch of the callee-saved
// registers replaces it (other platforms keep ucontext).
#if defined(__x86_64__) && defined(__linux__)
#define MSLH_FAST_SWITCH 1
#else
#define MSLH_FAST_SWITCH 0
#endif

namespace mslh {

constexpr int kSimdWidth = 32;  // Apple GPUs: 32 lanes per simdgroup
constexpr size_t kMaxThreadgroupMemory =
    32768;  // MTLDevice.maxThreadgroupMemoryLength on Apple silicon
constexpr int kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kSlotBytes = 64;  // largest value one lane can pass through a collective
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

// Reserve [guard | data pages | guard]; place the data flush against the upper guard
// (end_aligned: an overrun by even one byte faults) or against the lower one (an underrun faults).

// ---------------------------------------------------------------------------------------------
// Threads, simdgroups, threadgroups.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct V3 {
  T x, y, z;
};

enum class State { kReady, kBarrier, kSimd, kDone };
enum class Op : int {
  kNone,
  kBarrier,
  kSimdBarrier,
  kSum,
  kProd,
  kMin,
  kMax,
  kAnd,
  kOr,
  kXor,
  kAll,
  kAny,
  kBroadcast,
  kBroadcastFirst,
  kShuffle,
  kShuffleDown,
  kShuffleUp,
  kShuffleXor,
  kPrefixInclusiveSum,
  kPrefixExclusiveSum,
  kMatLoad,
  kMatStore,
  kMatMul
};

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kNone:
      return "none";
    case Op::kBarrier:
      return "threadgroup_barrier";
    case Op::kSimdBarrier:
      return "simdgroup_barrier";
    case Op::kSum:
      return "simd_sum";
    case Op::kProd:
      return "simd_product";
    case Op::kMin:
      return "simd_min";
    case Op::kMax:
      return "simd_max";
    case Op::kAnd:
      return "simd_and";
    case Op::kOr:
      return "simd_or";
    case Op::kXor:
      return "simd_xor";
    case Op::kAll:
      return "simd_all";
    case Op::kAny:
      return "simd_any";
    case Op::kBroadcast:
      return "simd_broadcast";
    case Op::kBroadcastFirst:
      return "simd_broadcast_first";
    case Op::kShuffle:
      return "simd_shuffle";
    case Op::kShuffleDown:
      return "simd_shuffle_down";
    case Op::kShuffleUp:
      return "simd_shuffle_up";
    case Op::kShuffleXor:
      return "simd_shuffle_xor";
    case Op::kPrefixInclusiveSum:
      return "simd_prefix_inclusive_sum";
    case Op::kPrefixExclusiveSum:
      return "simd_prefix_exclusive_sum";
    case Op::kMatLoad:
      return "simdgroup_load";
    case Op::kMatStore:
      return "simdgroup_store";
    case Op::kMatMul:
      return "simdgroup_multiply(_accumulate)";
  }
  return "?";
}

// The values of every [[attribute]] MLX may pass, for one thread.
struct ThreadAttrs {
  V3<uint32_t> thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threadgroups_per_grid, threads_per_grid,
      threads_per_threadgroup, dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
      quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup,
      dispatch_quadgroups_per_threadgroup, thread_execution_width, threads_per_simdgroup;
};

struct Fiber {
#if MSLH_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void* stack = nullptr;
  int index = 0;
  State state = State::kDone;
  ThreadAttrs attrs;
  Site wait_site;
  Op wait_op = Op::kNone;
};

struct SimdGroup {
  int nlanes = 0;      // lanes that exist (the last simdgroup of a threadgroup may be partial)
  int alive = 0;       // lanes that have not returned
  int arrived = 0;     // lanes waiting at the pending collective
  uint64_t round = 0;  // completed collectives; selects the slot buffer
  Op op = Op::kNone;
  Site site;
  bool need_full = false;
  uint32_t mask[2] = {0, 0};  // lanes that took part, per slot buffer
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
  std::vector<uint64_t> ready;  // bitmap of fibers in State::kReady
  std::vector<SimdGroup> simdgroups;
#if MSLH_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
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

// ---------------------------------------------------------------------------------------------
// What kernel code (through msl_shim.h) calls.
// ---------------------------------------------------------------------------------------------
void* guarded_alloc(RegionKind kind, const char* name, const char* type, size_t elem_size,
                    size_t nbytes, bool end_aligned, size_t guard = kGuard);

// The thread running now, and its simdgroup.
Fiber& self();
SimdGroup& my_simdgroup();

// Lane side of a simdgroup collective: deposit `n` bytes, wait until every live lane of the
// simdgroup has arrived at the same call, then return the slot buffer of that round (all lanes'
// deposits, plus per-lane results written by `complete`, which the last lane to arrive runs for
// all). Lanes that already returned from the kernel are inactive, as on the GPU; `need_full`
// ops require all 32 lanes.
int simd_rendezvous(Op op, Site site, const void* payload, size_t n,
                    void (*complete)(SimdGroup&, int), bool need_full);

// threadgroup_barrier: every thread of the threadgroup must arrive at the same call.
void threadgroup_rendezvous(Site site);

// Storage of threadgroup declaration `site_id` for the running threadgroup (poisoned when the
// threadgroup first uses it).
void* threadgroup_storage(int site_id, const char* name, const char* type, size_t elem_size,
                          size_t nbytes);

// The translator rewrites `threadgroup T name[N];` in a kernel body into a call to this with a
// per-declaration site id, so all threads of a threadgroup share the array.
template <typename T>
T& threadgroup_array(int site_id, const char* name, const char* type) {
  return *static_cast<T*>(
      threadgroup_storage(site_id, name, type, sizeof(std::remove_all_extents_t<T>), sizeof(T)));
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

int run_main(int argc, char** argv, const char* kernel, const BufferSpec* specs, int nbuf,
             void** bufs, void (*invoke)(const ThreadAttrs&));

}  // namespace mslh
