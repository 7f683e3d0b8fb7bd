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
// descriptors read) through a ring of STAGES slots, each with an mbarrier that says its stage
// landed. The tensor memory accelerator (TMA) fills the slots, issued by one thread, so the other
// threads spend no instructions on x and the loop has no block barrier. Each stage's MMAs are
// issued in two halves (two k16 steps each) from two sets of fragment registers, so that one half
// is decoded while the other multiplies; the packed words of the stage after next load from
// global memory meanwhile. A slot is refilled once every warp's MMAs on it retired. The
// accumulators leave through shared memory (transposed back to out's layout) for 16-byte
// coalesced stores.
//
// Weights: binary, the bonsai-packed uint32 words; ternary, per-lane digit words made per call by
// packed_fields.cu from the base-3 bytes (4 uint32 a row and stage). Decoded values are exact
// (±s, 0), so the result is a T GEMM of the dequantized weights with fp32 accumulation.
//
// MLX generates the signature (x, x_shape, x_ndim, weight, weight_shape, scales, out, maps; x
// [M, K] or [B, L, K], M = B * L; maps: uint8 scratch of 128 bytes a block plus 128) and defines
// template T (__half | __nv_bfloat16), S, TERNARY, BM (128 | 192 | 256), WG (1 | 2 | 3; BM * 8 a
// multiple of the block's 128 * WG threads), STAGES (>= 3).
//   grid (ceil(N / (64*WG)) * 128*WG, ceil(M / BM), 1), threadgroup (128*WG, 1, 1), dynamic shared
//   memory RING + 128 + 8 * STAGES + 1024 bytes, RING = max(STAGES * BM * 128, BM * (128*WG + 16))
//   rounded up to 128 (kernels.wgmma_shared_memory).

constexpr int BK = 64;
constexpr int BN = 64 * WG;
constexpr int THREADS = 128 * WG;
constexpr int SLOT = BM * BK * 2;  // bytes of one x stage
constexpr int CHUNKS = BM * (BK / 8) / THREADS;  // 16-byte pieces of x a thread copies a stage
constexpr int ACC = BM / 2;  // fp32 accumulators per thread (64 weight rows x BM / 128 threads)
constexpr int EROW = BN * 2 + 16;  // epilogue row bytes; the 16 keep the scatter conflict-free
constexpr int RING = ((STAGES * SLOT > BM * EROW ? STAGES * SLOT : BM * EROW) + 127) / 128 * 128;
static_assert(CHUNKS * THREADS == BM * 8 && STAGES >= 3 && BM % 64 == 0, "tile shape");

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

// x feed. mx.fast.cuda_kernel cannot pass a tensor map, so warp 0 writes one from zeros in shared
// memory (tensormap.replace, sm_90a) and copies it to this block's 128 bytes of `maps`, where the
// copy engine reads it; rows past M arrive as zeros. The TMA needs x 16-byte aligned; a
// misaligned x (a view at an odd offset, rare) takes the same loop with every thread copying its
// share of a stage by element loads (`vec` false), arriving on the slot's mbarrier.
const uint32_t mapsm = smem0 + RING;
const uint32_t bars = mapsm + 128;  // an mbarrier a slot: its stage landed
auto full = [&](int stage) { return bars + 8u * uint32_t(stage % STAGES); };
const uint64_t xaddr = reinterpret_cast<uint64_t>(x);
const bool aligned = xaddr % 16 == 0;
uint8_t* gmap = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(maps) + 127) &
                                           ~uintptr_t(127)) +
                size_t(blockIdx.y * gridDim.x + blockIdx.x) * 128;
// The element copy: piece i of this thread is row tid / 8 + i * THREADS / 8, 16-byte column
// tid % 8 (swizzled as the TMA writes it); rows past M read row M - 1 and store zeros.
const int xrow = tid / 8;
const uint32_t xdst = xrow * 128 + (((tid % 8) ^ (xrow & 7)) << 4);
// Stage `stage` into its slot if `go` (the same for every thread); predicated, not branched:
// ptxas serializes every wgmma of the kernel when a divergent branch in the loop holds work
// (C7520), as a thread-0 branch around the copy did.
auto fill = [&](int stage, bool go, auto vec) {
  const uint32_t dst = smem0 + (stage % STAGES) * SLOT;
  if constexpr (decltype(vec)::value) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %5, 0;\n"
                 "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%4], %6;\n"
                 "@p cp.async.bulk.tensor.2d.shared::cluster.global.tile"
                 ".mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n}\n"
                 :: "r"(dst), "l"(gmap), "r"(stage * BK), "r"(m0), "r"(full(stage)),
                    "r"(go && tid == 0 ? 1 : 0), "n"(SLOT) : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int row = m0 + xrow + i * (THREADS / 8);
      const bool in = row < M;
      const uint16_t* e = reinterpret_cast<const uint16_t*>(x) +  // in bounds when not `go`
                          size_t(min(row, M - 1)) * size_t(K) + min(stage, ksteps - 1) * BK +
                          (tid % 8) * 8;
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j] = in ? uint32_t(e[2 * j]) | (uint32_t(e[2 * j + 1]) << 16) : 0u;
      }
      asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %5, 0;\n"
                   "@p st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n}\n"
                   :: "r"(dst + xdst + i * (THREADS / 8) * 128), "r"(w[0]), "r"(w[1]),
                      "r"(w[2]), "r"(w[3]), "r"(go ? 1 : 0) : "memory");
    }
    // wgmma reads through the async proxy: make the stores visible to it, then arrive.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %1, 0;\n"
                 "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n"
                 :: "r"(full(stage)), "r"(go ? 1 : 0) : "memory");
  }
};
// Spin until stage `stage` landed (labels inside braces are local to each inlined copy).
auto wait_full = [&](int stage) {
  asm volatile("{\n.reg .pred p;\nWAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra WAIT;\n}\n" :: "r"(full(stage)), "r"((stage / STAGES) & 1)
               : "memory");
};
if (tid < 32) {
  if (aligned) {  // the tensor map of x: [M, K] of T, 64 x BM boxes, 128-byte swizzle
    asm volatile("st.shared.u32 [%0], 0;\n" :: "r"(mapsm + 4 * lane) : "memory");
    __syncwarp();
    if (lane == 0) {
      asm volatile(
          "tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;\n"
          "tensormap.replace.tile.rank.shared::cta.b1024.b32 [%0], 1;\n"
          "tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 0, %2;\n"
          "tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 1, %3;\n"
          "tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 0, %4;\n"
          "tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 1, %5;\n"
          "tensormap.replace.tile.global_stride.shared::cta.b1024.b64 [%0], 0, %6;\n"
          "tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 0, 1;\n"
          "tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 1, 1;\n"
          "tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], %7;\n"
          "tensormap.replace.tile.interleave_layout.shared::cta.b1024.b32 [%0], 0;\n"
          "tensormap.replace.tile.swizzle_mode.shared::cta.b1024.b32 [%0], 3;\n"
          "tensormap.replace.tile.fill_mode.shared::cta.b1024.b32 [%0], 0;\n"
          :: "r"(mapsm), "l"(xaddr), "r"(BK), "r"(BM), "r"(K), "r"(M), "l"(uint64_t(K) * 2),
             "n"(BonsaiSame<T, __nv_bfloat16>::value ? 10 : 6) : "memory");
    }
    __syncwarp();
    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu"
                 ".sync.aligned [%0], [%1], 128;\n" :: "l"(gmap), "r"(mapsm) : "memory");
  }
  if (lane == 0) {
    for (int s = 0; s < STAGES; ++s) {  // TMA: one arrival (with the bytes); else every thread
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n"
                   :: "r"(full(s)), "r"(aligned ? 1 : THREADS) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    if (aligned) {
      asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n"
                   :: "l"(gmap) : "memory");
    }
  }
}

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
auto mma_half = [&](Half& f, uint32_t b, int half, auto LAST) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    // One MMA over all BM rows of x: for BM = 256, one n256 ran a median 5% faster than two
    // n128 (0.95-1.25x over the model's shapes at 1024-4608 rows; H100, BENCHMARKS.md).
    bonsai_wgmma_rs<T, BM>(acc, f[q], bonsai_wgmma_desc(b + (2 * half + q) * 32));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  if constexpr (decltype(LAST)::value) {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  } else {
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
  }
};
// Slot hand-back: once the MMAs of stage kt - 1 retired (the first wait of stage kt), warps 1..
// arrive at hardware barrier 1 + its slot and warp 0 syncs there (every thread counted) before
// thread 0 refills the slot with stage kt - 1 + STAGES; with the element copy every thread
// syncs, as every thread copies. Only slots that get refilled take part.
auto refills = [&](int kt) { return kt > 0 && kt - 1 + STAGES < ksteps; };
auto handback = [&](int kt, bool me) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %0, 0;\n@p bar.arrive %1, %2;\n}\n"
               :: "r"(me ? 1 : 0), "r"(1 + (kt + STAGES - 1) % STAGES), "n"(THREADS)
               : "memory");
};
auto takeback = [&](int kt, bool me) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %0, 0;\n@p bar.sync %1, %2;\n}\n"
               :: "r"(me ? 1 : 0), "r"(1 + (kt + STAGES - 1) % STAGES), "n"(THREADS)
               : "memory");
};
// Stage kt: its words are in buffer P, the next stage's in NP, its first half already decoded
// into fa. Each half's wait_group 1 retires the MMAs of the other fragment set, which is then
// decoded while this half multiplies. TAIL: one of the last two stages, which refill nothing
// (STAGES >= 3); LAST: the last, whose second half retires every MMA. kernels.py caps 128-row
// tiles at 128 registers (__maxnreg__) so that two blocks share an SM; 192- and 256-row tiles
// hold 1.5 and 2 times the accumulators and run one block per SM.
auto step = [&](int kt, auto P, auto NP, auto TAIL, auto LAST, auto vec) {
  constexpr bool tail = decltype(TAIL)::value, last = decltype(LAST)::value;
  constexpr bool tma = decltype(vec)::value;
  wait_full(kt);
  const uint32_t b = smem0 + (kt % STAGES) * SLOT;
  mma_half(fa, b, 0, BonsaiBool<false>{});
  if constexpr (!tail && tma) {
    handback(kt, refills(kt) && tid >= 32);
  }
  decode(fb, P, BonsaiBool<true>{});
  mma_half(fb, b, 1, LAST);
  if constexpr (!last) {
    decode(fa, NP, BonsaiBool<false>{});
  }
  if constexpr (!tail) {
    load_w(kt + 2, P);
    takeback(kt, refills(kt) && (tid < 32 || !tma));
    fill(kt - 1 + STAGES, refills(kt), vec);
  }
};
// K is a multiple of 128, so stages come in pairs: the loop is unrolled by two (the buffers
// alternate by name) and the last pair is peeled, its last half retiring every MMA: with one
// group left in flight past the loop, ptxas (CUDA 13.0) moved the epilogue's accumulator reads
// above the wait after it (session 5's hazard, BENCHMARKS.md). The loop exists twice, for the
// TMA and the element copy.
auto mainloop = [&](auto vec) {
  constexpr BonsaiBool<false> no{};
  constexpr BonsaiBool<true> yes{};
  load_w(0, no);
  load_w(1, yes);
  __syncthreads();  // the mbarriers are initialized
  for (int s = 0; s < min(STAGES, ksteps); ++s) {
    fill(s, true, vec);
  }
  decode(fa, no, no);
  for (int kt = 0; kt < ksteps - 2; kt += 2) {
    step(kt, no, yes, no, no, vec);
    step(kt + 1, yes, no, no, no, vec);
  }
  step(ksteps - 2, no, yes, yes, no, vec);
  step(ksteps - 1, yes, no, yes, yes, vec);
};
if (aligned) {
  mainloop(BonsaiBool<true>{});
} else {
  mainloop(BonsaiBool<false>{});
}
// Every MMA retired in the last step (above); the fence keeps NVVM from moving accumulator reads.
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
