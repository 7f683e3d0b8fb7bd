// Ternary bonsai-packed rows -> 2-bit planes for packed_wgmma.cu (CUDA only), in a per-call
// scratch: the wgmma kernel decodes every weight of its register fragments at random positions,
// which base-3 digits make costly; planes make it a few bit operations. Thread i turns the run of
// 16 inputs i of planes[N, K/16] into one uint32 holding, for pair p (weights 2p, 2p + 1): bit p
// and bit 16 + p = weight 2p / 2p + 1 is non-zero, bit 8 + p and bit 24 + p = it is negative.
// MLX generates the signature (weight, weight_shape, planes).
//   grid (N * K / 16, 1, 1), threadgroup (256, 1, 1)

const int N = weight_shape[0];
const int groups = weight_shape[1] / BONSAI_TERNARY_GROUP_BYTES;
const int K = groups * BONSAI_GROUP;
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
const BonsaiRun run = bonsai_run(i, N, K);
if (!run.valid) {
  return;
}
const int n = run.n;
const int k = run.k;
const uint32_t raw = bonsai_ternary_bytes4(weight, n, groups, k);
const BonsaiCodes16 codes = bonsai_ternary_codes16(raw, bonsai_ternary_digit(k));
uint32_t word = 0;
#pragma unroll
for (int j = 0; j < 16; ++j) {
  const int bit = (j % 2) * 16 + j / 2;  // pair j / 2: even weight in the low half, odd in the high
  word |= (codes.c[j] != 0.0f ? 1u : 0u) << bit;
  word |= (codes.c[j] < 0.0f ? 1u : 0u) << (bit + 8);
}
planes[i] = word;
