// CUDA twin of packed_decode.metal for mx.fast.cuda_kernel: dense[Nc, K] (T) = the packed rows,
// 16 inputs a thread. MLX generates the signature (weight, scales, scales_shape, dense) and
// defines template T (__half | __nv_bfloat16 | float), S, TERNARY as constants.
//   grid (Nc * K / 16 rounded up to whole threadgroups, 1, 1), threadgroup (256, 1, 1); 32-bit
//   indices: Nc * K / 8 < 2^32
//
// Ternary: thread i decodes the run of 16 inputs i, as the Metal kernel does. Binary: the same
// values, another assignment of threads to them, so that each store instruction of a warp writes
// 512 contiguous bytes: thread i of warp w decodes the 8-input chunks 64 w + i and 64 w + 32 + i
// of the row-major output (a chunk never crosses a row: K is a multiple of 128). A run of 16 a
// thread wrote 16 bytes of each 32-byte sector per instruction; the chunks decoded the model's
// binary layers 1.27-1.32x faster on an H100 (2.2 vs 1.7 TB/s; BENCHMARKS.md). Ternary runs kept:
// decoding 8 base-3 inputs costs as much as 16 here, and the chunks ran 1.1-1.2x slower.

const int N = scales_shape[0];
const int groups = scales_shape[1];
const int K = groups * BONSAI_GROUP;
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
if (TERNARY) {
  const BonsaiRun run = bonsai_run(i, N, K);
  if (!run.valid) {
    return;
  }
  const float scale =
      float(scales[size_t(run.n) * size_t(groups) + size_t(run.k / BONSAI_GROUP)]);
  const uint32_t raw = bonsai_ternary_bytes4(weight, run.n, groups, run.k);
  bonsai_store16<T>(dense + size_t(i) * 16,
                    bonsai_ternary_codes16(raw, bonsai_ternary_digit(run.k)), scale);
} else {
  const uint32_t chunks = uint32_t(N) * uint32_t(K / 8);
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const uint32_t j = (i / 32) * 64 + c * 32 + i % 32;
    if (j < chunks) {
      const int n = int(j / uint32_t(K / 8));
      const int k = int(j - uint32_t(n) * uint32_t(K / 8)) * 8;
      const float scale = float(scales[size_t(n) * size_t(groups) + size_t(k / BONSAI_GROUP)]);
      const uint32_t word = uint32_t(weight[size_t(n) * size_t(K / 32) + size_t(k / 32)]);
      bonsai_store8<T>(dense + size_t(j) * 8, word >> (k % 32), scale);
    }
  }
}
