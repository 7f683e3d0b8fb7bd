// Ternary bonsai-packed rows -> 2-bit planes for packed_wgmma.cu (CUDA only), in a per-call
// scratch: the wgmma kernel decodes every weight of its register fragments at random positions,
// which base-3 digits make costly; planes make it a few bit operations. planes[N, K/16] holds one
// uint32 per run of 16 inputs: for pair p (weights 2p, 2p + 1), bit p and bit 16 + p = weight
// 2p / 2p + 1 is non-zero, bit 8 + p and bit 24 + p = it is negative.
//
// Thread i converts group i of the matrix (row i / groups; rows are contiguous, so its 26 bytes
// start at byte 26 i, read as 13 two-byte loads: weight and its row slices start at even bytes)
// into its 8 words. This pass runs before every ternary wgmma call, so it is kept to about 5
// integer operations a weight: each base-3 digit costs a multiply-shift and a multiply-add into
// a word of 2-bit fields, and per run a few whole-word bit operations turn the fields into the
// two planes. (The GEMV's bonsai_ternary_digits10 gives float digits: converting them back
// costs 2 more instructions a weight, 1032 a group against 696; digits peeled off one by one
// with v / 3, 776.)
// MLX generates the signature (weight, weight_shape, planes).
//   grid (N * K / 128, 1, 1), threadgroup (256, 1, 1)

const int N = weight_shape[0];
const int groups = weight_shape[1] / BONSAI_TERNARY_GROUP_BYTES;
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
if (i >= uint32_t(N) * uint32_t(groups)) {
  return;
}
// fields[r]: digit t (code t - 1) of input 16 r + 2 p + e of the group in bits 2 p + 16 e, i.e.
// already split into the even / odd halves the planes use.
uint32_t fields[8] = {0, 0, 0, 0, 0, 0, 0, 0};
const uint16_t* pairs =
    reinterpret_cast<const uint16_t*>(weight + size_t(i) * BONSAI_TERNARY_GROUP_BYTES);
#pragma unroll
for (int b = 0; b < BONSAI_TERNARY_GROUP_BYTES; ++b) {
  const uint32_t v = (uint32_t(pairs[b / 2]) >> (8 * (b % 2))) & 0xffu;
#pragma unroll
  for (int d = 0; d < 5; ++d) {
    const int j = 5 * b + d;  // the last byte holds 3 inputs; its spare digits are not read
    if (j < BONSAI_GROUP) {
      const uint32_t t = bonsai_div_pow3(v, d) - (d < 4 ? 3u * bonsai_div_pow3(v, d + 1) : 0u);
      fields[j / 16] |= t << (2 * ((j % 16) / 2) + 16 * (j % 2));
    }
  }
}
// Bits 2p (+ 16) of x to bits p (+ 16): three gather steps within each 16-bit half.
auto compact = [](uint32_t x) {
  x = (x | (x >> 1)) & 0x33333333u;
  x = (x | (x >> 2)) & 0x0f0f0f0fu;
  return (x | (x >> 4)) & 0x00ff00ffu;
};
#pragma unroll
for (int r = 0; r < 8; ++r) {
  const uint32_t u = fields[r] ^ 0x55555555u;  // t = 0, 1, 2 -> u = 1, 0, 3
  const uint32_t nonzero = (u | (u >> 1)) & 0x55555555u;  // u != 0
  const uint32_t negative = (u & ~(u >> 1)) & 0x55555555u;  // u == 1
  planes[size_t(i) * 8 + r] = compact(nonzero) | (compact(negative) << 8);
}
