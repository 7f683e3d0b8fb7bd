// CUDA twin of packed_gemv.metal for mx.fast.cuda_kernel: same ownership (a block of 4 warps
// streams ROWS W rows once; thread t takes the 16-input runs t, t + 128, ... of binary rows, the
// byte pairs t, t + 128, ... of ternary ones), same decode and edge rules; warp shuffles stand in
// for simd_sum, and binary rows read x with 16-byte loads. CUDA only: ternary weights held as
// digit words (WORDS; kernels.ternary_words) take the binary rows' loop, a run's codes read from
// its stage's four words. MLX generates the signature (x, x_shape, x_ndim, weight, weight_shape,
// scales, out; x [M, K] or [B, L, K], M = B * L) and defines template T, S, TERNARY, MR, ROWS,
// WORDS as constants.
//   grid (ceil(N / ROWS) * 128, ceil(M / MR), 1), threadgroup (128, 1, 1)

__shared__ float partial[4 * ROWS * MR];

const int M = BONSAI_X_ROWS(x_shape, x_ndim);  // x [M, K] or [B, L, K]
const int K = BONSAI_X_COLS(x_shape, x_ndim);
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int tid = threadIdx.x;
const int warp = tid / 32;
const int lane = tid % 32;
const int n0 = blockIdx.x * ROWS;
const int m0 = blockIdx.y * MR;
// Rows of x start 16-byte aligned when x does (K % 128 == 0); otherwise load element-wise.
const bool x_vec = (reinterpret_cast<uintptr_t>(x) % 16) == 0;

float acc[ROWS][MR];
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    acc[r][m] = 0.0f;
  }
}

if (TERNARY && !WORDS) {
  // Byte pairs (bonsai_decode.h) put every digit at a fixed position. sum_j (t_j - 1) x_j =
  // sum_j t_j x_j - sum_j x_j, the second sum shared by the ROWS rows.
  const uint8_t* wbytes = reinterpret_cast<const uint8_t*>(weight);
  for (int i = tid; i < groups * BONSAI_TERNARY_PAIRS; i += 128) {
    const int g = i / BONSAI_TERNARY_PAIRS;
    const int h = i - g * BONSAI_TERNARY_PAIRS;
    const int k = g * BONSAI_GROUP + 10 * h;
    const int valid = h == BONSAI_TERNARY_PAIRS - 1 ? 8 : 10;
    float xv[MR][10];
    float xsum[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const bool ok = m0 + m < M;
      const T* xr = x + size_t(ok ? m0 + m : 0) * size_t(K) + size_t(k);
      xsum[m] = 0.0f;
#pragma unroll
      for (int j = 0; j < 10; ++j) {
        xv[m][j] = ok && j < valid ? float(xr[j]) : 0.0f;
        xsum[m] += xv[m][j];
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const size_t row = size_t(n) * size_t(groups);
        const float scale = float(scales[row + size_t(g)]);
        const uint32_t pair = *reinterpret_cast<const uint16_t*>(
            wbytes + (row + size_t(g)) * BONSAI_TERNARY_GROUP_BYTES + size_t(2 * h));
        const BonsaiDigits10 d = bonsai_ternary_digits10(pair);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          float dot = -xsum[m];
#pragma unroll
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
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m0 + m < M) {
        bonsai_load16<T>(x + size_t(m0 + m) * size_t(K) + size_t(k), xv[m], x_vec);
      } else {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          xv[m][j] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const float scale = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
        BonsaiCodes16 codes;
        if (WORDS) {  // 4 words a stage of 64 inputs, 16-byte aligned (K % 128 == 0)
          const uint4 stage = reinterpret_cast<const uint4*>(weight)[size_t(n) * size_t(K / 64) +
                                                                     size_t(k / 64)];
          codes = bonsai_words_codes16(stage, (k / 16) % 4);
        } else {
          const uint32_t word = uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]);
          codes = bonsai_binary_codes16(bonsai_binary_bits16(word, k));
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          float dot = 0.0f;
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            dot += codes.c[j] * xv[m][j];
          }
          acc[r][m] += scale * dot;
        }
      }
    }
  }
}

#pragma unroll
for (int r = 0; r < ROWS; ++r) {
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const float total = bonsai_warp_sum(acc[r][m]);
    if (lane == 0) {
      partial[warp * ROWS * MR + r * MR + m] = total;
    }
  }
}
__syncthreads();
if (tid < ROWS * MR) {
  const int n = n0 + tid / MR;
  const int m = m0 + tid % MR;
  if (n < N && m < M) {
    const float total = partial[tid] + partial[ROWS * MR + tid] + partial[2 * ROWS * MR + tid] +
                        partial[3 * ROWS * MR + tid];
    out[size_t(m) * size_t(N) + size_t(n)] = T(total);
  }
}
