// CUDA twin of packed_decode.metal for mx.fast.cuda_kernel: thread i decodes the run of 16 inputs
// i of dense[Nc, K] (T) and writes it with 16-byte stores. MLX generates the signature
// (weight, scales, scales_shape, dense) and defines template T (__half | __nv_bfloat16 | float),
// S, TERNARY as constants.
//   grid (Nc * K / 16, 1, 1), threadgroup (256, 1, 1)

const int N = scales_shape[0];
const int groups = scales_shape[1];
const int K = groups * BONSAI_GROUP;
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
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
bonsai_store16<T>(dense + size_t(i) * 16, codes, scale);
