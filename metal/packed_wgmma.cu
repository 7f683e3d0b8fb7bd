// Hopper (sm_90a) packed GEMM for mx.fast.cuda_kernel: out[M, N] = x[M, K] @ W^T with the packed
// weights decoded straight into registers as the A operand of warpgroup MMA (wgmma), and x the B
// operand from shared memory. CUDA-only: Apple GPUs have no wgmma; the portable tiled GEMM is
// packed_gemm.*.
//
// The product is computed transposed, D = W x^T: a block of WG warpgroups owns BN = 64 * WG
// weight rows (64 per warpgroup, wgmma's M) and BM rows of x (wgmma's N: one n128, n192 or n256
// MMA per k16 step), fp32 accumulators in registers. Each thread decodes exactly the weights of its
// own A fragments (rows g and g + 8 of its warp's 16, inputs 2t, 2t+1, 2t+8, 2t+9 of each k16
// step), so decoded weights never touch shared memory; only x does, and each decoded fragment
// feeds BM rows of x (256-row blocks halve the decoding per product; kernels.py). x advances 64
// inputs per stage (one 128-byte, 128B-swizzled row of T per x row, the layout wgmma's
// descriptors read) through a ring of STAGES slots filled by cp.async AHEAD stages in advance.
// Each stage's MMAs are issued in two halves (two k16 steps each) from two sets of fragment
// registers, so that one half is decoded while the other multiplies; the packed words of the
// stage after next load from global memory meanwhile. A slot is refilled only after every
// warpgroup's MMAs on it retired (wgmma.wait_group 1 after each half, then the next stage's
// barrier). The accumulators leave through shared memory (transposed back to out's layout) for
// 16-byte coalesced stores.
//
// Weights: binary, the bonsai-packed uint32 words; ternary, per-lane digit words made per call by
// packed_fields.cu from the base-3 bytes (4 uint32 a row and stage). Decoded values are exact
// (±s, 0), so the result is a T GEMM of the dequantized weights with fp32 accumulation.
//
// MLX generates the signature (x, x_shape, x_ndim, weight, weight_shape, scales, out; x [M, K] or
// [B, L, K], M = B * L) and defines template T (__half | __nv_bfloat16), S, TERNARY,
// BM (128 | 192 | 256), WG (1 | 2 | 3; BM * 8 a multiple of the block's 128 * WG threads),
// STAGES (>= 3).
//   grid (ceil(N / (64*WG)) * 128*WG, ceil(M / BM), 1), threadgroup (128*WG, 1, 1), dynamic shared
//   memory max(STAGES * BM * 128, BM * (128*WG + 16)) + 1024 bytes.

constexpr int BK = 64;
constexpr int BN = 64 * WG;
constexpr int THREADS = 128 * WG;
constexpr int SLOT = BM * BK * 2;  // bytes of one x stage
constexpr int CHUNKS = BM * (BK / 8) / THREADS;  // 16-byte pieces of x a thread copies a stage
constexpr int ACC = BM / 2;  // fp32 accumulators per thread (64 weight rows x BM / 128 threads)
constexpr int AHEAD = STAGES - 2;  // stages in flight beyond the one multiplied
constexpr int EROW = BN * 2 + 16;  // epilogue row bytes; the 16 keep the scatter conflict-free
static_assert(CHUNKS * THREADS == BM * 8 && AHEAD >= 1 && BM % 64 == 0, "tile shape");

extern __shared__ __align__(1024) uint8_t bonsai_smem[];
// wgmma's 128B swizzle repeats every 1024 bytes: slots start on such a boundary.
const uint32_t smem_raw = static_cast<uint32_t>(__cvta_generic_to_shared(bonsai_smem));
const uint32_t smem0 = (smem_raw + 1023u) & ~1023u;

const int M = BONSAI_X_ROWS(x_shape, x_ndim);  // x [M, K] or [B, L, K]
const int K = BONSAI_X_COLS(x_shape, x_ndim);
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int tid = threadIdx.x;
const int lane = tid % 32;
const int g = lane / 4;
const int t = lane % 4;
const int m0 = blockIdx.y * BM;
const int n0 = blockIdx.x * BN;
const int ksteps = K / BK;
// This thread's two weight rows: g and g + 8 of its warp's 16 in its warpgroup's 64.
const int row0 = n0 + (tid / 128) * 64 + (tid % 128) / 32 * 16 + g;

// x copy plan, fixed for the whole K loop (the loop is issue-bound: keep per-stage work small).
// Piece i of this thread is row tid / 8 + i * THREADS / 8, 16-byte column tid % 8, so 8 threads
// read a row's 128 contiguous bytes and every piece has the same swizzled column; rows past M are
// zero-filled (source size 0).
const int xrow = tid / 8;
const uint32_t xdst = xrow * 128 + (((tid % 8) ^ (xrow & 7)) << 4);
const T* xsrc = x + size_t(min(m0 + xrow, M - 1)) * size_t(K) + size_t((tid % 8) * 8);
const size_t xstride = size_t(THREADS / 8) * size_t(K);
uint32_t xin = 0;  // bit i: piece i's row is inside x
#pragma unroll
for (int i = 0; i < CHUNKS; ++i) {
  xin |= (m0 + xrow + i * (THREADS / 8) < M ? 1u : 0u) << i;
}
// VEC: x is 16-byte aligned (cp.async); otherwise element-wise loads and ordinary stores.
auto copy_x = [&](int stage, auto vec) {
  const uint32_t a = smem0 + (stage % STAGES) * SLOT + xdst;
  const T* src = xsrc + stage * BK;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const uint32_t dst = a + i * (THREADS / 8) * 128;
    const T* p = src + i * xstride;
    if constexpr (decltype(vec)::value) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(dst), "l"(p), "r"((xin >> i) & 1u ? 16 : 0) : "memory");
    } else {
      uint32_t w[4] = {0, 0, 0, 0};
      if ((xin >> i) & 1u) {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[j] = uint32_t(e[2 * j]) | (uint32_t(e[2 * j + 1]) << 16);
        }
      }
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
                   :: "r"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
    }
  }
};

// Packed words of one stage for rows row0 and row0 + 8: binary, the row's 2 words; ternary, this
// lane's 1 of the stage's 4 (its digits of the 4 runs). Scales as T bits in both halves
// (ternary: the high half negated, see bonsai_ternary_pairs). Rows past N give zeros.
constexpr int WORDS = TERNARY ? 4 : 2;  // a row's words per stage
const uint32_t* wrow[2];
const S* srow[2];
bool wvalid[2];
#pragma unroll
for (int h = 0; h < 2; ++h) {
  const int n = row0 + 8 * h;
  wvalid[h] = n < N;
  wrow[h] = reinterpret_cast<const uint32_t*>(weight) +
            size_t(min(n, N - 1)) * size_t(ksteps * WORDS) + (TERNARY ? t : 0);
  srow[h] = scales + size_t(min(n, N - 1)) * size_t(groups);
}
// The words of consecutive stages alternate between two buffers (P: which one, a compile-time
// BonsaiBool so that the registers are named statically).
uint32_t wbuf[2][2][2];  // ternary: [0] only
uint32_t sbuf[2][2];
auto load_w = [&](int stage, auto P) {
  constexpr int p = decltype(P)::value ? 1 : 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sbuf[p][h] = wvalid[h] ? bonsai_bits2<T>(srow[h][stage * BK / BONSAI_GROUP]) ^
                                 (TERNARY ? BONSAI_TERNARY_SA : 0u)
                           : 0u;
    if constexpr (TERNARY) {
      wbuf[p][h][0] = wrow[h][stage * WORDS];
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(wrow[h] + stage * WORDS);
      wbuf[p][h][0] = v.x;
      wbuf[p][h][1] = v.y;
    }
  }
};
using Half = uint32_t[2][4];
auto decode = [&](Half& f, auto P, auto H) {
  constexpr int p = decltype(P)::value ? 1 : 0;
  constexpr int half = decltype(H)::value ? 1 : 0;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int kk = 2 * half + q;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (TERNARY) {
        bonsai_ternary_pairs(wbuf[p][h][0], kk, sbuf[p][h], f[q][h], f[q][2 + h]);
      } else {
        const uint32_t bits = wbuf[p][h][kk / 2] >> (16 * (kk % 2) + 2 * t);
        f[q][h] = bonsai_binary_pair(bits, sbuf[p][h]);
        f[q][2 + h] = bonsai_binary_pair(bits >> 8, sbuf[p][h]);
      }
    }
  }
};

float acc[ACC];
#pragma unroll
for (int e = 0; e < ACC; ++e) {
  acc[e] = 0.0f;
}
bonsai_fence_operands(acc);

// Half `half` of the stage whose x is at b: two k16 steps from fragment set f, then wait until
// at most these MMAs are in flight.
Half fa, fb;
auto mma_half = [&](Half& f, uint32_t b, int half) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    // One MMA over all BM rows of x: for BM = 256, one n256 ran a median 5% faster than two
    // n128 (0.95-1.25x over the model's shapes at 1024-4608 rows; H100, BENCHMARKS.md).
    bonsai_wgmma_rs<T, BM>(acc, f[q], bonsai_wgmma_desc(b + (2 * half + q) * 32));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
};
// Stage kt: its words are in buffer P, the next stage's in NP, its first half already decoded
// into fa. Each half's wait_group 1 retires the MMAs of the other fragment set, which is then
// decoded while this half multiplies. Ternary 128-row tiles want more registers than two blocks
// per SM allow (164 a thread with nvcc 13.0's ptxas); kernels.py caps them at 128 (__maxnreg__):
// a few spills, 9-19% faster than one block per SM at the step's large shapes (BENCHMARKS.md).
// 192- and 256-row tiles hold 1.5 and 2 times the accumulators and run one block per SM.
auto step = [&](int kt, auto P, auto NP, auto vec) {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(AHEAD - 1) : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (kt + AHEAD < ksteps) {
    copy_x(kt + AHEAD, vec);
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  const uint32_t b = smem0 + (kt % STAGES) * SLOT;
  mma_half(fa, b, 0);
  decode(fb, P, BonsaiBool<true>{});
  mma_half(fb, b, 1);
  if (kt + 1 < ksteps) {
    decode(fa, NP, BonsaiBool<false>{});
  }
  if (kt + 2 < ksteps) {
    load_w(kt + 2, P);
  }
};
// The loop exists twice, for aligned and misaligned x, and is unrolled by two so that the
// buffers alternate by name.
auto mainloop = [&](auto vec) {
  // Prologue: x of stages 0 .. AHEAD-1 in flight, stage 0's first half decoded.
  for (int s = 0; s < AHEAD; ++s) {
    if (s < ksteps) {
      copy_x(s, vec);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  load_w(0, BonsaiBool<false>{});
  decode(fa, BonsaiBool<false>{}, BonsaiBool<false>{});
  if (ksteps > 1) {
    load_w(1, BonsaiBool<true>{});
  }
  for (int kt = 0; kt < ksteps; kt += 2) {
    step(kt, BonsaiBool<false>{}, BonsaiBool<true>{}, vec);
    if (kt + 1 < ksteps) {
      step(kt + 1, BonsaiBool<true>{}, BonsaiBool<false>{}, vec);
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
};
if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
  mainloop(BonsaiBool<true>{});
} else {
  mainloop(BonsaiBool<false>{});
}
// The fence binds NVVM, not ptxas: in a development variant of this kernel (x fed by bulk
// copies) ptxas (CUDA 13.0) scheduled the epilogue's accumulator conversions above the wait
// after the loop, losing part of the last stage. Here they come after it (SASS of all eight
// instantiations), and the first-use self-check in kernels.py catches it otherwise. Waiting
// inside the loop instead costs 5-10% of the binary kernel's time (BENCHMARKS.md).
bonsai_fence_operands(acc);
__syncthreads();  // every MMA has read its x: the ring becomes the epilogue tile

// Accumulator 4 b + e of this thread: weight row row0 + 8 (e / 2), x row m0 + 8 b + 2 t + e % 2.
// Scatter as T into E[x row][weight row], then copy rows out.
const uint32_t ebase = smem0;
const int nl = row0 - n0;
#pragma unroll
for (int b = 0; b < BM / 8; ++b) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int ml = 8 * b + 2 * t + e % 2;
    const T v = T(acc[4 * b + e]);
    asm volatile("st.shared.u16 [%0], %1;\n"
                 :: "r"(ebase + ml * EROW + (nl + 8 * (e / 2)) * 2),
                    "h"(*reinterpret_cast<const uint16_t*>(&v)) : "memory");
  }
}
__syncthreads();
constexpr int ROW_CHUNKS = BN / 8;
for (int q = tid; q < BM * ROW_CHUNKS; q += THREADS) {
  const int ml = q / ROW_CHUNKS;
  const int c = q % ROW_CHUNKS;
  const int m = m0 + ml;
  const int n = n0 + c * 8;
  if (m >= M || n >= N) {
    continue;
  }
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(ebase + ml * EROW + c * 16));
  T* o = out + size_t(m) * size_t(N) + size_t(n);
  if (n + 8 <= N && N % 8 == 0) {
    *reinterpret_cast<uint4*>(o) = v;
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    uint16_t* o16 = reinterpret_cast<uint16_t*>(o);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (n + e < N) {
        o16[e] = uint16_t(w[e / 2] >> (16 * (e % 2)));
      }
    }
  }
}
