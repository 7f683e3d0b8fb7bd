// CUDA twin of packed_gemv.metal for mx.fast.cuda_kernel: same ownership (a warp streams ROWS
// W rows once, lane l takes the 16-input runs l, l + 32, ...), same decode and edge rules; warp
// shuffles stand in for simd_sum. MLX generates the signature (x, x_shape, weight, weight_shape,
// scales, out) and defines template T, S, TERNARY, MR, ROWS as constants.
//   grid (ceil(N / (4*ROWS)) * 128, ceil(M / MR), 1), threadgroup (128, 1, 1)

const int M = x_shape[0];
const int K = x_shape[1];
const int N = weight_shape[0];
const int groups = K / BONSAI_GROUP;
const int lane = threadIdx.x % 32;
const int n0 = (blockIdx.x * 4 + threadIdx.x / 32) * ROWS;
const int m0 = blockIdx.y * MR;

float acc[ROWS][MR];
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    acc[r][m] = 0.0f;
  }
}

for (int k = lane * 16; k < K; k += 32 * 16) {
  float xv[MR][16];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const bool ok = m0 + m < M;
    const T* xr = x + size_t(ok ? m0 + m : 0) * size_t(K) + size_t(k);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      xv[m][j] = ok ? float(xr[j]) : 0.0f;
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int n = n0 + r;
    if (n < N) {
      const float scale = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
      BonsaiCodes16 codes;
      if (TERNARY) {
        const size_t b = size_t(n) * size_t(groups * BONSAI_TERNARY_GROUP_BYTES) +
                         size_t(bonsai_ternary_byte(k));
        const uint32_t raw = uint32_t(weight[b]) | (uint32_t(weight[b + 1]) << 8) |
                             (uint32_t(weight[b + 2]) << 16) | (uint32_t(weight[b + 3]) << 24);
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
    const int n = n0 + r;
    if (lane == r * MR + m && n < N && m0 + m < M) {
      out[size_t(m0 + m) * size_t(N) + size_t(n)] = T(total);
    }
  }
}
