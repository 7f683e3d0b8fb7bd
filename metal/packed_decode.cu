// CUDA twin of packed_decode.metal for mx.fast.cuda_kernel: thread i decodes the run of 16 inputs
// i of dense[Nc, K] (T) and writes it with 16-byte stores. MLX generates the signature
// (weight, scales, scales_shape, dense) and defines template T (__half | __nv_bfloat16 | float),
// S, TERNARY as constants.
//   grid (Nc * K / 16, 1, 1), threadgroup (256, 1, 1)

const int N = scales_shape[0];
const int groups = scales_shape[1];
const int K = groups * BONSAI_GROUP;
// 32-bit index math (64-bit division is slow on GPUs): the caller keeps N * K / 16 < 2^32.
const uint32_t runs = uint32_t(K / 16);
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
if (i >= uint32_t(N) * runs) {
  return;
}
const int n = int(i / runs);
const int k = int(i - uint32_t(n) * runs) * 16;
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
