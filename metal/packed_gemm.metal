// Tiled decode-GEMM: out[M, N] = x[M, K] @ W^T for a bonsai-packed W, W never expanded in device
// memory. Body of an mx.fast.metal_kernel; MLX generates the signature:
//   inputs  x [M, K] or [B, L, K] (T; M = B * L), weight (uint32 [N, K/32]
//           binary | uint8 [N, K/128*26] ternary), scales [N, K/128] (S), and x_shape / x_ndim /
//           weight_shape (used below)
//   output  out [M, N] or [B, L, N] (T)
//   template T, S, TERNARY (bool), BM, BN (= BM), WM, WN
//   grid (ceil(N/BN) * 32*WM*WN, ceil(M/BM), 1), threadgroup (32*WM*WN, 1, 1)
// Twin: packed_gemm.cu (same tiles, same staging map, same decode, same edges).
//
// Each threadgroup computes a BM x BN tile of out. The K loop steps by BK = 32: every thread
// stages runs of 16 consecutive K-elements of x rows and decodes runs of 16 of W rows (thread t:
// rows t/2 + r*THREADS/2, columns (t%2)*16), both into float threadgroup tiles; WM x WN
// simdgroups then multiply the tiles with 8x8 simdgroup matrices, accumulating in float. Rows past M or N are staged as zeros and
// never stored. K is a multiple of 128, so there is no K edge.

constexpr int BK = 32;
constexpr int LDK = BK + 4;  // row stride (floats) of the staged tiles; padding eases bank conflicts
constexpr int LDC = BN + 4;  // row stride of the output tile in the epilogue
constexpr int THREADS = 32 * WM * WN;
constexpr int RUNS = 2 * BM / THREADS;  // 16-element runs each thread stages per tile and K-step
constexpr int TM = BM / WM / 8;
constexpr int TN = BN / WN / 8;
constexpr int TILES = (BM + BN) * LDK;
constexpr int SMEM = TILES > BM * LDC ? TILES : BM * LDC;
static_assert(BM == BN && RUNS >= 1 && RUNS * THREADS == 2 * BM, "2*BM runs per tile");
static_assert(TM * WM * 8 == BM && TN * WN * 8 == BN, "simdgroup tiles must cover the block");

threadgroup float smem[SMEM];
threadgroup float* xs = smem;
threadgroup float* ws = smem + BM * LDK;

const int M = BONSAI_X_ROWS(x_shape, x_ndim);  // x [M, K] or [B, L, K]
const int K = BONSAI_X_COLS(x_shape, x_ndim);
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int sm = sg / WN;
const int sn = sg % WN;
const int m0 = int(threadgroup_position_in_grid.y) * BM;
const int n0 = int(threadgroup_position_in_grid.x) * BN;

// Run r of thread t: tile row t/2 + r*THREADS/2; W columns (t%2)*16 .. +16 of the K-step, x
// columns (t%2)*8 .. +8 and 16 + (t%2)*8 .. +8 (thread pairs read whole 32-byte sectors of x).
const int lcol = (tid % 2) * 16;
const int xcol = (tid % 2) * 8;

simdgroup_matrix<float, 8, 8> acc[TM][TN];
for (int i = 0; i < TM; ++i) {
  for (int j = 0; j < TN; ++j) {
    acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
}

for (int k0 = 0; k0 < K; k0 += BK) {
  const int k = k0 + lcol;

  // Global -> registers: 16 x values, the raw bits of 16 weights and their group scale.
  float xr[RUNS][16];
  BonsaiCodes16 codes[RUNS];
  float scale[RUNS];
  for (int r = 0; r < RUNS; ++r) {
    const int row = tid / 2 + r * (THREADS / 2);
    const bool x_ok = m0 + row < M;
    const size_t xbase = size_t(x_ok ? m0 + row : 0) * size_t(K) + size_t(k0 + xcol);
    for (int j = 0; j < 16; ++j) {
      xr[r][j] = x_ok ? float(x[xbase + size_t(j % 8 + (j / 8) * 16)]) : 0.0f;
    }
    const int n = n0 + row;
    uint32_t raw = 0;
    scale[r] = 0.0f;
    if (n < N) {
      scale[r] = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
      if (TERNARY) {
        raw = bonsai_ternary_bytes4(weight, n, groups, k);
      } else {
        raw = bonsai_binary_bits16(uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]), k);
      }
    }
    codes[r] = TERNARY ? bonsai_ternary_codes16(raw, bonsai_ternary_digit(k))
                       : bonsai_binary_codes16(raw);
  }

  // Registers -> threadgroup, once every simdgroup is done with the previous tiles.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < RUNS; ++r) {
    const int row = tid / 2 + r * (THREADS / 2);
    for (int j = 0; j < 16; ++j) {
      xs[row * LDK + xcol + j % 8 + (j / 8) * 16] = xr[r][j];
      ws[row * LDK + lcol + j] = codes[r].c[j] * scale[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int kk = 0; kk < BK; kk += 8) {
    simdgroup_matrix<float, 8, 8> a[TM];
    simdgroup_matrix<float, 8, 8> b[TN];
    for (int i = 0; i < TM; ++i) {
      simdgroup_load(a[i], xs + (sm * TM * 8 + i * 8) * LDK + kk, LDK);
    }
    for (int j = 0; j < TN; ++j) {
      // ws holds W rows (n) by k; loading it transposed gives the k x n block of W^T.
      simdgroup_load(b[j], ws + (sn * TN * 8 + j * 8) * LDK + kk, LDK, ulong2(0, 0), true);
    }
    for (int i = 0; i < TM; ++i) {
      for (int j = 0; j < TN; ++j) {
        simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }
}

// Epilogue: fragments -> threadgroup (reusing the tiles) -> T, storing only rows < M, cols < N.
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = 0; i < TM; ++i) {
  for (int j = 0; j < TN; ++j) {
    simdgroup_store(acc[i][j], smem + (sm * TM * 8 + i * 8) * LDC + sn * TN * 8 + j * 8, LDC);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int r = 0; r < RUNS; ++r) {
  const int orow = tid / 2 + r * (THREADS / 2);
  const int ocol = (tid % 2) * (BN / 2);
  if (m0 + orow < M) {
    const size_t obase = size_t(m0 + orow) * size_t(N);
    for (int c = 0; c < BN / 2; ++c) {
      const int n = n0 + ocol + c;
      if (n < N) {
        out[obase + size_t(n)] = T(smem[orow * LDC + ocol + c]);
      }
    }
  }
}
