// Ternary bonsai-packed rows -> per-lane digit words for packed_wgmma.cu (CUDA only), in a
// per-call scratch: the wgmma kernel decodes every weight of its register fragments at scattered
// positions, which base-3 bytes make costly. Here each weight becomes its base-3 digit (0: -1,
// 1: 0, 2: +1) in 2 bits, placed where the lane that decodes it reads it: for each stage of 64
// inputs (4 runs of 16) a row has 4 words; word t belongs to lane t (t = lane % 4 of the
// kernel's fragments) and holds, for run r, the digits of inputs 2t, 2t + 1, 2t + 8, 2t + 9 (the
// A-fragment pairs of that lane; i-th of them: i = 0-3) in bits 16 (r / 2) + 2 (r % 2) + 4 i:
// two runs share each nibble, so one mask gives a run's digits a nibble each. The kernel loads
// one word a row and stage and decodes a pair in about two byte permutes (bonsai_ternary_pairs).
// 2 bits a weight: N * K / 4 bytes of scratch a call, 32 bytes a group against the 26 it reads.
//
// Thread i converts group i of the matrix (row i / groups; rows are contiguous, so its 26 bytes
// start at byte 26 i, read as 13 two-byte loads: weight and its row slices start at even bytes)
// into its 8 words (two stages), a multiply-shift and a multiply-add per digit.
// MLX generates the signature (weight, weight_shape, fields).
//   grid (N * K / 128, 1, 1), threadgroup (256, 1, 1)

const int N = weight_shape[0];
const int groups = weight_shape[1] / BONSAI_TERNARY_GROUP_BYTES;
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
if (i >= uint32_t(N) * uint32_t(groups)) {
  return;
}
uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
const uint16_t* pairs =
    reinterpret_cast<const uint16_t*>(weight + size_t(i) * BONSAI_TERNARY_GROUP_BYTES);
#pragma unroll
for (int b = 0; b < BONSAI_TERNARY_GROUP_BYTES; ++b) {
  const uint32_t v = (uint32_t(pairs[b / 2]) >> (8 * (b % 2))) & 0xffu;
#pragma unroll
  for (int d = 0; d < 5; ++d) {
    const int j = 5 * b + d;  // the last byte holds 3 inputs; its spare digits are not read
    if (j < BONSAI_GROUP) {
      const uint32_t digit = bonsai_div_pow3(v, d) - (d < 4 ? 3u * bonsai_div_pow3(v, d + 1) : 0u);
      const int run = j / 16, at = j % 16;  // input `at` of run `run` (0-7) of the group
      const int word = (run / 4) * 4 + (at % 8) / 2;
      words[word] |= digit << (16 * ((run % 4) / 2) + 2 * (run % 2) + 4 * (at % 2 + 2 * (at / 8)));
    }
  }
}
uint4* out = reinterpret_cast<uint4*>(fields + size_t(i) * 8);
#pragma unroll
for (int q = 0; q < 2; ++q) {
  out[q] = make_uint4(words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
}
