// GEMV / small-M kernel: out[M, N] = x[M, K] @ W^T for a bonsai-packed W, for M of a few rows.
// Body of an mx.fast.metal_kernel; MLX generates the signature:
//   inputs  x [M, K] or [B, L, K] (T; M = B * L), weight (uint32 binary |
//           uint8 ternary), scales [N, K/128] (S), and x_shape / x_ndim / weight_shape (used below)
//   output  out [M, N] or [B, L, N] (T)
//   template T, S, TERNARY (bool), MR (x rows per pass), ROWS (W rows per threadgroup)
//   grid (ceil(N / ROWS) * 128, ceil(M / MR), 1), threadgroup (128, 1, 1)
// Twin: packed_gemv.cu.
//
// A threadgroup of 4 simdgroups owns ROWS output columns and streams those W rows once. K is
// split over the 128 threads: thread t takes the runs of 16 inputs t, t + 128, ... of binary
// rows, the byte pairs t, t + 128, ... (10 inputs, bonsai_decode.h) of ternary ones, decodes each
// in registers for the ROWS rows and applies it to MR rows of x, so every x value loaded serves
// ROWS columns. Partial sums meet in simd_sum, then across the 4 simdgroups in
// threadgroup memory. Columns past N and x rows past M are neither read nor written.

threadgroup float partial[4 * ROWS * MR];

const int M = BONSAI_X_ROWS(x_shape, x_ndim);  // x [M, K] or [B, L, K]
const int K = BONSAI_X_COLS(x_shape, x_ndim);
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int n0 = int(threadgroup_position_in_grid.x) * ROWS;
const int m0 = int(threadgroup_position_in_grid.y) * MR;

float acc[ROWS][MR];
for (int r = 0; r < ROWS; ++r) {
  for (int m = 0; m < MR; ++m) {
    acc[r][m] = 0.0f;
  }
}

if (TERNARY) {
  // Byte pairs put every digit at a fixed position. sum_j (t_j - 1) x_j = sum_j t_j x_j -
  // sum_j x_j, the second sum shared by the ROWS rows.
  device const uint8_t* wbytes = reinterpret_cast<device const uint8_t*>(weight);
  for (int i = tid; i < groups * BONSAI_TERNARY_PAIRS; i += 128) {
    const int g = i / BONSAI_TERNARY_PAIRS;
    const int h = i - g * BONSAI_TERNARY_PAIRS;
    const int k = g * BONSAI_GROUP + 10 * h;
    const int valid = h == BONSAI_TERNARY_PAIRS - 1 ? 8 : 10;
    float xv[MR][10];
    float xsum[MR];
    for (int m = 0; m < MR; ++m) {
      const bool ok = m0 + m < M;
      const size_t base = size_t(ok ? m0 + m : 0) * size_t(K) + size_t(k);
      xsum[m] = 0.0f;
      for (int j = 0; j < 10; ++j) {
        xv[m][j] = ok && j < valid ? float(x[base + size_t(j)]) : 0.0f;
        xsum[m] += xv[m][j];
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const size_t row = size_t(n) * size_t(groups);
        const float scale = float(scales[row + size_t(g)]);
        const uint32_t pair = uint32_t(*reinterpret_cast<device const uint16_t*>(
            wbytes + (row + size_t(g)) * BONSAI_TERNARY_GROUP_BYTES + size_t(2 * h)));
        const BonsaiDigits10 d = bonsai_ternary_digits10(pair);
        for (int m = 0; m < MR; ++m) {
          float dot = -xsum[m];
          for (int j = 0; j < 10; ++j) {
            dot += d.t[j] * xv[m][j];
          }
          acc[r][m] += scale * dot;
        }
      }
    }
  }
} else {
  for (int k = tid * 16; k < K; k += 128 * 16) {
    float xv[MR][16];
    for (int m = 0; m < MR; ++m) {
      const bool ok = m0 + m < M;
      const size_t base = size_t(ok ? m0 + m : 0) * size_t(K) + size_t(k);
      for (int j = 0; j < 16; ++j) {
        xv[m][j] = ok ? float(x[base + size_t(j)]) : 0.0f;
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const float scale = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
        const uint32_t word = uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]);
        const BonsaiCodes16 codes = bonsai_binary_codes16(bonsai_binary_bits16(word, k));
        for (int m = 0; m < MR; ++m) {
          float dot = 0.0f;
          for (int j = 0; j < 16; ++j) {
            dot += codes.c[j] * xv[m][j];
          }
          acc[r][m] += scale * dot;
        }
      }
    }
  }
}

for (int r = 0; r < ROWS; ++r) {
  for (int m = 0; m < MR; ++m) {
    const float total = simd_sum(acc[r][m]);
    if (lane == 0) {
      partial[sg * ROWS * MR + r * MR + m] = total;
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid < ROWS * MR) {
  const int n = n0 + tid / MR;
  const int m = m0 + tid % MR;
  if (n < N && m < M) {
    const float total = partial[tid] + partial[ROWS * MR + tid] + partial[2 * ROWS * MR + tid] +
                        partial[3 * ROWS * MR + tid];
    out[size_t(m) * size_t(N) + size_t(n)] = T(total);
  }
}
