// CUDA twin of packed_gemm.metal for mx.fast.cuda_kernel: the same BM x BN block tiles, BK = 32
// K-steps, staging map (thread t: rows t/2 + r*THREADS/2, 16 columns at (t%2)*16), decode and
// edge rules; the tile product runs on tensor cores (ldmatrix + mma.sync m16n8k16) from T tiles
// in shared memory instead of 8x8 simdgroup matrices. The next K-step is loaded into registers
// while the current one is multiplied, and the tiles are double-buffered, so one barrier per step.
// MLX generates the signature (x, x_shape, x_ndim, weight, weight_shape, scales, out; x [M, K] or
// [B, L, K], M = B * L) and defines template T (__half | __nv_bfloat16), S, TERNARY, BM,
// BN (= BM), WM, WN as constants.
//   grid (ceil(N/BN) * 32*WM*WN, ceil(M/BM), 1), threadgroup (32*WM*WN, 1, 1)

constexpr int BK = 32;
constexpr int LDK = BK + 8;  // row stride (elements): 80 bytes, conflict-free for ldmatrix
constexpr int THREADS = 32 * WM * WN;
constexpr int RUNS = 2 * BM / THREADS;  // 16-element runs each thread stages per tile and K-step
constexpr int WTM = BM / WM;  // warp tile
constexpr int WTN = BN / WN;
constexpr int MI = WTM / 16;
constexpr int NI = WTN / 8;
static_assert(BM == BN && RUNS >= 1 && RUNS * THREADS == 2 * BM, "2*BM runs per tile");
static_assert(MI * 16 == WTM && NI * 8 == WTN && NI % 2 == 0, "warp tiles of 16 x 16 blocks");

__shared__ __align__(16) T xs[2][BM * LDK];
__shared__ __align__(16) T ws[2][BN * LDK];

const int M = BONSAI_X_ROWS(x_shape, x_ndim);  // x [M, K] or [B, L, K]
const int K = BONSAI_X_COLS(x_shape, x_ndim);
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int tid = threadIdx.x;
const int warp = tid / 32;
const int lane = tid % 32;
const int wm = warp / WN;
const int wn = warp % WN;
const int m0 = blockIdx.y * BM;
const int n0 = blockIdx.x * BN;

// Run r of thread t: tile row t/2 + r*THREADS/2; W columns (t%2)*16 .. +16 of the K-step, x
// columns (t%2)*8 .. +8 and 16 + (t%2)*8 .. +8, so that each thread pair reads whole 32-byte
// sectors of x.
const int lcol = (tid % 2) * 16;
const int xcol = (tid % 2) * 8;
// Rows of x start 16-byte aligned when x does (K % 128 == 0); otherwise load element-wise.
const bool x_vec = (reinterpret_cast<uintptr_t>(x) % 16) == 0;

float acc[MI][NI][4];
#pragma unroll
for (int i = 0; i < MI; ++i) {
#pragma unroll
  for (int j = 0; j < NI; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[i][j][e] = 0.0f;
    }
  }
}

// Staged registers of one K-step: 16 x values (raw T bits), raw weight bits, group scale.
uint4 xv[RUNS][2];
uint32_t raw[RUNS];
float scale[RUNS];
int staged_k = 0;

auto load = [&](int k0) {
  const int k = k0 + lcol;
  staged_k = k;
#pragma unroll
  for (int r = 0; r < RUNS; ++r) {
    const int row = tid / 2 + r * (THREADS / 2);
    const T* xrow = x + size_t(m0 + row) * size_t(K) + size_t(k0);
    if (m0 + row >= M) {
      xv[r][0] = make_uint4(0, 0, 0, 0);
      xv[r][1] = make_uint4(0, 0, 0, 0);
    } else if (x_vec) {
      xv[r][0] = *reinterpret_cast<const uint4*>(xrow + xcol);
      xv[r][1] = *reinterpret_cast<const uint4*>(xrow + xcol + 16);
    } else {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(xrow + xcol);
      uint32_t w[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int c = (j % 4) * 2 + (j / 4) * 16;
        w[j] = uint32_t(p[c]) | (uint32_t(p[c + 1]) << 16);
      }
      xv[r][0] = make_uint4(w[0], w[1], w[2], w[3]);
      xv[r][1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
    const int n = n0 + row;
    raw[r] = 0;
    scale[r] = 0.0f;
    if (n < N) {
      scale[r] = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
      if (TERNARY) {
        raw[r] = bonsai_ternary_bytes4(weight, n, groups, k);
      } else {
        raw[r] = bonsai_binary_bits16(uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]), k);
      }
    }
  }
};

auto store = [&](int buf) {
#pragma unroll
  for (int r = 0; r < RUNS; ++r) {
    const int row = tid / 2 + r * (THREADS / 2);
    const BonsaiCodes16 codes = TERNARY
        ? bonsai_ternary_codes16(raw[r], bonsai_ternary_digit(staged_k))
        : bonsai_binary_codes16(raw[r]);
    *reinterpret_cast<uint4*>(&xs[buf][row * LDK + xcol]) = xv[r][0];
    *reinterpret_cast<uint4*>(&xs[buf][row * LDK + xcol + 16]) = xv[r][1];
    bonsai_store16<T>(&ws[buf][row * LDK + lcol], codes, scale[r]);
  }
};

const int ksteps = K / BK;
load(0);
for (int kt = 0; kt < ksteps; ++kt) {
  const int buf = kt & 1;
  // The buffer written here was last read two steps ago, before the previous barrier.
  store(buf);
  __syncthreads();
  if (kt + 1 < ksteps) {
    load((kt + 1) * BK);
  }
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    uint32_t a[MI][4];
    uint32_t b[NI][2];
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      // lanes 0-15: rows 0-15 at k, lanes 16-31: rows 0-15 at k + 8 -> the a0..a3 fragment order
      bonsai_ldmatrix_x4(a[i], &xs[buf][(wm * WTM + i * 16 + lane % 16) * LDK + kk + (lane / 16) * 8]);
    }
#pragma unroll
    for (int j = 0; j < NI; j += 2) {
      // matrices: (n block j, k), (j, k + 8), (j + 1, k), (j + 1, k + 8)
      uint32_t r[4];
      bonsai_ldmatrix_x4(
          r, &ws[buf][(wn * WTN + j * 8 + (lane / 16) * 8 + lane % 8) * LDK + kk + ((lane / 8) % 2) * 8]);
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        bonsai_mma16816<T>(acc[i][j], a[i], b[j]);
      }
    }
  }
}

// Epilogue straight from the accumulators: lane holds rows g, g + 8 and columns 2*(l%4) + {0, 1}.
const int g = lane / 4;
const int c2 = (lane % 4) * 2;
#pragma unroll
for (int i = 0; i < MI; ++i) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + wm * WTM + i * 16 + g + h * 8;
    if (m < M) {
      T* orow = out + size_t(m) * size_t(N);
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int n = n0 + wn * WTN + j * 8 + c2;
        const float v0 = acc[i][j][2 * h];
        const float v1 = acc[i][j][2 * h + 1];
        if (n + 1 < N && N % 2 == 0) {
          *reinterpret_cast<uint32_t*>(orow + n) = bonsai_pack2<T>(v0, v1);
        } else {
          if (n < N) {
            orow[n] = T(v0);
          }
          if (n + 1 < N) {
            orow[n + 1] = T(v1);
          }
        }
      }
    }
  }
}
