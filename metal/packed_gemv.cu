// CUDA twin of packed_gemv.metal for mx.fast.cuda_kernel: same ownership (a block of 4 warps
// streams ROWS W rows once, thread t takes the 16-input runs t, t + 128, ...), same decode and
// edge rules; warp shuffles stand in for simd_sum, and x is read with 16-byte loads. MLX generates
// the signature (x, x_shape, weight, weight_shape, scales, out) and defines template T, S,
// TERNARY, MR, ROWS as constants.
//   grid (ceil(N / ROWS) * 128, ceil(M / MR), 1), threadgroup (128, 1, 1)

__shared__ float partial[4 * ROWS * MR];

const int M = x_shape[0];
const int K = x_shape[1];
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
      if (TERNARY) {
        const uint32_t raw = bonsai_ternary_bytes4(weight, n, groups, k);
        codes = bonsai_ternary_codes16(raw, bonsai_ternary_digit(k));
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
