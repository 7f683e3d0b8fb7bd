// Definitions of msl_runtime.h: guarded memory, the fault handler, rendezvous, the scheduler
// and the process entry. Compiled once per toolchain and linked into every kernel binary.
#include "msl_runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#if MSLH_FAST_SWITCH
// mslh_switch(save, next): push callee-saved registers and the FP control words, store the stack
// pointer in *save, load `next` and pop the same frame from it.
extern "C" void mslh_switch(void** save, void* next);
asm(R"(
  .text
  .globl mslh_switch
  .type mslh_switch, @function
mslh_switch:
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
  .size mslh_switch, .-mslh_switch
)");

#endif

namespace mslh {

static std::vector<Region>& regions() {
  static std::vector<Region> r;
  return r;
}

static size_t page_size() {
  static size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

void* guarded_alloc(RegionKind kind, const char* name, const char* type, size_t elem_size,
                    size_t nbytes, bool end_aligned, size_t guard) {
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

static void set_state(Fiber& f, State s) {
  f.state = s;
  uint64_t bit = uint64_t(1) << (f.index % 64);
  if (s == State::kReady) {
    rt().ready[f.index / 64] |= bit;
  } else {
    rt().ready[f.index / 64] &= ~bit;
  }
}

static void describe_thread(char* out, size_t n, const Fiber* f) {
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

void fail(const char* fmt, ...) {
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

static void on_fault(int sig, siginfo_t* info, void* uctx) {
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
    long long idx = off >= 0
                        ? off / (long long)hit->elem_size
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

static void install_fault_handler() {
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

SimdGroup& my_simdgroup() { return rt().simdgroups[self().attrs.simdgroup_index_in_threadgroup]; }

Fiber& self() {
  if (!rt().cur) fail("MSL builtin called outside a kernel thread");
  return *rt().cur;
}

static void yield_to_scheduler() {
  Fiber& f = *rt().cur;
#if MSLH_FAST_SWITCH
  mslh_switch(&f.sp, rt().sched_sp);
#else
  swapcontext(&f.ctx, &rt().sched_ctx);
#endif
}

static SimdGroup& my_simdgroup_of(const Fiber& f) {
  return rt().simdgroups[f.attrs.simdgroup_index_in_threadgroup];
}

static void finish_collective(SimdGroup& g) {
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
    if (f.state == State::kSimd && &my_simdgroup_of(f) == &g) set_state(f, State::kReady);
}

int simd_rendezvous(Op op, Site site, const void* payload, size_t n,
                    void (*complete)(SimdGroup&, int), bool need_full) {
  Fiber& f = self();
  SimdGroup& g = my_simdgroup();
  if (need_full && g.nlanes != kSimdWidth)
    fail(
        "%s (%s:%u) needs a full simdgroup of 32 threads; this simdgroup has %d "
        "(threadgroup size not a multiple of 32?)",
        op_name(op), site.file, site.line, g.nlanes);
  if (g.arrived == 0) {
    g.op = op;
    g.site = site;
    g.complete = complete;
    g.need_full = need_full;
    g.mask[g.round & 1] = 0;
  } else if (g.op != op || !(g.site == site)) {
    fail(
        "divergent simdgroup: lanes wait at %s (%s:%u) and %s (%s:%u); the harness runs "
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
    set_state(f, State::kSimd);
    yield_to_scheduler();
  }
  f.wait_op = Op::kNone;
  return buf;
}

void threadgroup_rendezvous(Site site) {
  Runtime& r = rt();
  Fiber& f = self();
  if (r.finished > 0)
    fail(
        "threadgroup_barrier (%s:%u) reached after other threads of the threadgroup returned; "
        "every thread of a threadgroup must reach each barrier",
        site.file, site.line);
  if (r.barrier_arrived == 0) {
    r.barrier_site = site;
  } else if (!(r.barrier_site == site)) {
    fail(
        "threads of one threadgroup wait at different threadgroup_barrier calls (%s:%u and "
        "%s:%u)",
        r.barrier_site.file, r.barrier_site.line, site.file, site.line);
  }
  r.barrier_arrived++;
  f.wait_site = site;
  f.wait_op = Op::kBarrier;
  if (r.barrier_arrived == r.nthreads) {
    r.barrier_arrived = 0;
    for (Fiber& o : r.fibers)
      if (o.state == State::kBarrier) set_state(o, State::kReady);
  } else {
    set_state(f, State::kBarrier);
    yield_to_scheduler();
  }
  f.wait_op = Op::kNone;
}

void* threadgroup_storage(int site_id, const char* name, const char* type, size_t elem_size,
                          size_t nbytes) {
  Runtime& r = rt();
  if (site_id >= int(r.tg_sites.size())) r.tg_sites.resize(site_id + 1);
  Runtime::TgSite& s = r.tg_sites[site_id];
  if (!s.data) {
    r.tg_bytes += nbytes;
    if (r.tg_bytes > kMaxThreadgroupMemory)
      fail(
          "threadgroup memory of %zu bytes exceeds the 32 KiB that Apple GPUs provide "
          "(while declaring '%s')",
          r.tg_bytes, name);
    s.data = guarded_alloc(RegionKind::kThreadgroup, name, type, elem_size, nbytes,
                           r.launch.schedule != 1);
    s.nbytes = nbytes;
  }
  if (s.epoch != r.tg_epoch) {
    std::memset(s.data, r.launch.poison, s.nbytes);
    s.epoch = r.tg_epoch;
  }
  return s.data;
}

static void fiber_main() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  r.invoke(f.attrs);
  // The thread returned from the kernel.
  set_state(f, State::kDone);
  r.finished++;
  if (r.barrier_arrived > 0)
    fail(
        "thread returned while other threads of its threadgroup wait at threadgroup_barrier "
        "(%s:%u); every thread of a threadgroup must reach each barrier",
        r.barrier_site.file, r.barrier_site.line);
  SimdGroup& g = my_simdgroup_of(f);
  g.alive--;
  if (g.arrived > 0 && g.arrived == g.alive) finish_collective(g);
  r.cur = nullptr;
#if MSLH_FAST_SWITCH
  void* dead;
  mslh_switch(&dead, r.sched_sp);
#else
  setcontext(&r.sched_ctx);
#endif
}

static void start_fiber(Fiber& f) {
#if MSLH_FAST_SWITCH
  // The frame mslh_switch pops: FP control words, six registers, then fiber_main as the return
  // address; above it a null return address for fiber_main (which never returns), placed so that
  // fiber_main starts with the stack alignment of a normal call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kFiberStack) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

[[noreturn]] static void report_deadlock() {
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

static int pick_ready(int schedule) {
  Runtime& r = rt();
  int words = int(r.ready.size());
  if (schedule == 0) {
    for (int w = 0; w < words; ++w)
      if (r.ready[w]) return w * 64 + std::countr_zero(r.ready[w]);
  } else if (schedule == 1) {
    for (int w = words - 1; w >= 0; --w)
      if (r.ready[w]) return w * 64 + 63 - std::countl_zero(r.ready[w]);
  } else {
    int count = 0;
    for (uint64_t word : r.ready) count += std::popcount(word);
    if (count == 0) return -1;
    int k = int(r.rng() % uint64_t(count));
    for (int w = 0; w < words; ++w) {
      int c = std::popcount(r.ready[w]);
      if (k >= c) {
        k -= c;
        continue;
      }
      uint64_t word = r.ready[w];
      for (; k > 0; --k) word &= word - 1;
      return w * 64 + std::countr_zero(word);
    }
  }
  return -1;
}

static void run_threadgroup(V3<uint32_t> tgpos) {
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
  r.ready.assign((n + 63) / 64, 0);
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
    f.index = i;
    set_state(f, State::kReady);
    f.wait_op = Op::kNone;
    start_fiber(f);
  }
  while (r.finished < n) {
    int i = pick_ready(L.schedule);
    if (i < 0) report_deadlock();
    Fiber& f = r.fibers[i];
    r.cur = &f;
#if MSLH_FAST_SWITCH
    mslh_switch(&r.sched_sp, f.sp);
#else
    swapcontext(&r.sched_ctx, &f.ctx);
#endif
    r.cur = nullptr;
  }
}

static void run_grid(void (*invoke)(const ThreadAttrs&)) {
  Runtime& r = rt();
  const Launch& L = r.launch;
  r.invoke = invoke;
  r.rng.seed(L.seed);
  uint64_t tg_threads = uint64_t(L.group.x) * L.group.y * L.group.z;
  if (L.grid.x == 0 || L.grid.y == 0 || L.grid.z == 0 || tg_threads == 0)
    fail("empty grid (%u,%u,%u) or threadgroup (%u,%u,%u)", L.grid.x, L.grid.y, L.grid.z, L.group.x,
         L.group.y, L.group.z);
  if (tg_threads > uint64_t(kMaxThreadsPerThreadgroup))
    fail("threadgroup of %" PRIu64 " threads exceeds the maximum of %d", tg_threads,
         kMaxThreadsPerThreadgroup);
  V3<uint32_t> ntg{(L.grid.x + L.group.x - 1) / L.group.x, (L.grid.y + L.group.y - 1) / L.group.y,
                   (L.grid.z + L.group.z - 1) / L.group.z};
  // With a partial edge threadgroup that is more than one row tall, MSL does not define how
  // thread_index_in_threadgroup (and so simdgroup membership) is laid out: refuse, don't guess.
  if (L.grid.x % L.group.x != 0 && L.group.y * L.group.z > 1)
    fail(
        "grid.x (%u) is not a multiple of threadgroup.x (%u) while the threadgroup has several "
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

static std::vector<unsigned char> read_file(const char* path) {
  std::vector<unsigned char> data;
  FILE* f = std::fopen(path, "rb");
  if (!f) fail("harness: cannot open %s", path);
  unsigned char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) data.insert(data.end(), chunk, chunk + n);
  std::fclose(f);
  return data;
}

int run_main(int argc, char** argv, const char* kernel, const BufferSpec* specs, int nbuf,
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
      std::fscanf(f, " group %u %u %u", &r.launch.group.x, &r.launch.group.y, &r.launch.group.z) !=
          3)
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
      if (bytes.size() != nbytes)
        fail("harness: %s has %zu bytes, expected %zu", path, bytes.size(), nbytes);
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
    if (!o || std::fwrite(bufs[i], 1, sizes[i], o) != sizes[i])
      fail("harness: cannot write %s", path);
    std::fclose(o);
  }
  return 0;
}

}  // namespace mslh
