// Decode to scratch: dense[Nc, K] (T) = the bonsai-packed rows given, for MLX's own matmul.
// Body of an mx.fast.metal_kernel; MLX generates the signature:
//   inputs  weight (uint32 binary | uint8 ternary) [Nc, *], scales [Nc, K/128] (S),
//           and scales_shape (used below)
//   output  dense [Nc, K] (T)
//   template T, S, TERNARY (bool)
//   grid (Nc * K / 16 rounded up to whole threadgroups, 1, 1), threadgroup (256, 1, 1)
// Twin: packed_decode.cu. Thread i decodes the run of 16 inputs i of the row-major output.

const int N = scales_shape[0];
const int groups = scales_shape[1];
const int K = groups * BONSAI_GROUP;
const uint32_t i = uint32_t(thread_position_in_grid.x);
const BonsaiRun run = bonsai_run(i, N, K);
if (!run.valid) {
  return;
}
const int n = run.n;
const int k = run.k;
const float scale = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
BonsaiCodes16 codes;
if (TERNARY) {
  const uint32_t raw = bonsai_ternary_bytes4(weight, n, groups, k);
  codes = bonsai_ternary_codes16(raw, bonsai_ternary_digit(k));
} else {
  const uint32_t word = uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]);
  codes = bonsai_binary_codes16(bonsai_binary_bits16(word, k));
}
for (int j = 0; j < 16; ++j) {
  dense[size_t(i) * 16 + size_t(j)] = T(codes.c[j] * scale);
}
