// bonsai-packed v1 decoding, shared word for word by the Metal (MSL) and CUDA kernels.
//
// Register arithmetic plus one templated byte load (bonsai_ternary_bytes4), nothing specific to
// a language, so the same text compiles as Metal Shading Language, as CUDA C++ (NVRTC) and as
// host C++. The kernels stage weights in runs of 16 consecutive inputs of one row (a run never
// crosses a 128-wide scale group) and turn the raw bits of a run into 16 codes c in {-1, 0, +1};
// the weight is c * scale of the group. The GEMV reads ternary rows by byte pairs instead
// (below), where every digit has a fixed position.
//
// binary:  uint32 words, element k of a row is bit (k % 32) of word k / 32; bit 1 -> +1, 0 -> -1.
// ternary: 26 bytes per group of 128; byte j holds elements 5j..5j+4 as base-3 digits
//          t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 (t0 = lowest element); code = t - 1.

#ifndef BONSAI_DECODE_H
#define BONSAI_DECODE_H

#if defined(__CUDACC__)
#define BONSAI_FN __device__ __forceinline__
#else
#define BONSAI_FN inline
#endif

#define BONSAI_GROUP 128
#define BONSAI_TERNARY_GROUP_BYTES 26

// Rows M and inputs K of a kernel's x, [M, K] or [B, L, K] (M = B * L), from the x_shape and x_ndim
// that MLX passes: the kernels read 3-D x as it is, without a reshape node around the call. Macros,
// not functions, because x_shape's type differs between Metal and CUDA; constant indices, because
// indexing x_shape by x_ndim - 1 made ptxas spill in the wgmma kernel.
#define BONSAI_X_ROWS(x_shape, x_ndim) ((x_ndim) == 3 ? (x_shape)[0] * (x_shape)[1] : (x_shape)[0])
#define BONSAI_X_COLS(x_shape, x_ndim) ((x_ndim) == 3 ? (x_shape)[2] : (x_shape)[1])

struct BonsaiCodes16 {
  float c[16];
};

// The 16-bit run of a binary row starting at input k (k % 16 == 0) sits in `word` at bit k % 32.
BONSAI_FN uint32_t bonsai_binary_bits16(uint32_t word, int k) {
  return (word >> (k & 16)) & 0xffffu;
}

BONSAI_FN BonsaiCodes16 bonsai_binary_codes16(uint32_t bits16) {
  BonsaiCodes16 out;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    out.c[j] = ((bits16 >> j) & 1u) ? 1.0f : -1.0f;
  }
  return out;
}

// The run of 16 inputs that thread i of a decode-style grid owns in a row-major [N, K] matrix:
// row n, first input k; valid is false for threads past the end. 32-bit index math (64-bit
// division is slow on GPUs): the caller keeps N * K / 16 < 2^32.
struct BonsaiRun {
  int n;
  int k;
  bool valid;
};

BONSAI_FN BonsaiRun bonsai_run(uint32_t i, int N, int K) {
  const uint32_t runs = uint32_t(K / 16);
  BonsaiRun r;
  r.valid = i < uint32_t(N) * runs;
  r.n = int(i / runs);
  r.k = int(i - uint32_t(r.n) * runs) * 16;
  return r;
}

// Byte (from the start of the row) holding input k of a ternary row.
BONSAI_FN int bonsai_ternary_byte(int k) {
  const uint32_t u = uint32_t(k);  // unsigned: the divisions become shifts and a multiply
  return int((u / 128u) * 26u + (u % 128u) / 5u);
}

// Base-3 digit index of input k inside its byte.
BONSAI_FN int bonsai_ternary_digit(int k) {
  return int((uint32_t(k) % 128u) % 5u);
}

// The four bytes, little-endian, holding input k's run of 16 in ternary row n of a packed matrix
// of `groups` groups a row (a run spans at most four bytes, all inside its group). A template
// over the pointer, so that kernels instantiated for binary weights still compile the call.
template <typename P>
BONSAI_FN uint32_t bonsai_ternary_bytes4(P weight, int n, int groups, int k) {
  const size_t b = size_t(n) * size_t(groups * BONSAI_TERNARY_GROUP_BYTES) +
                   size_t(bonsai_ternary_byte(k));
  return uint32_t(weight[b]) | (uint32_t(weight[b + 1]) << 8) | (uint32_t(weight[b + 2]) << 16) |
         (uint32_t(weight[b + 3]) << 24);
}

// floor(v / 3^i) for v <= 242 and i in 0..4: a multiply and a shift instead of a division
// (exact over the whole range; tests/test_kernels.py checks every value).
BONSAI_FN uint32_t bonsai_div_pow3(uint32_t v, int i) {
  const uint32_t m = i == 0 ? 16384u : i == 1 ? 5462u : i == 2 ? 1821u : i == 3 ? 607u : 203u;
  return (v * m) >> 14;
}

// Codes of the 16 inputs starting at digit `digit` of the first of four consecutive bytes,
// given little-endian in `bytes4` (a run of 16 spans at most four bytes, all inside its group).
BONSAI_FN BonsaiCodes16 bonsai_ternary_codes16(uint32_t bytes4, int digit) {
  BonsaiCodes16 out;
  uint32_t cur = bonsai_div_pow3(bytes4 & 0xffu, digit);
  uint32_t rest = bytes4 >> 8;
  int d = digit;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    if (d == 5) {
      cur = rest & 0xffu;
      rest >>= 8;
      d = 0;
    }
    const uint32_t q = (cur * 171u) >> 9;  // cur / 3, exact for cur <= 255
    out.c[j] = float(int(cur - 3u * q) - 1);
    cur = q;
    ++d;
  }
  return out;
}

// Ternary rows as byte pairs (the GEMV's unit): pair h of group g is bytes 2h, 2h + 1 of the
// group, inputs 10h .. 10h + 9 of it; the last pair (h = 12) holds 8 inputs (its 2 spare digits,
// whatever they hold, are decoded but multiply zeros instead of x).
#define BONSAI_TERNARY_PAIRS 13

struct BonsaiDigits10 {
  float t[10];
};

// The base-3 digits t in {0, 1, 2} (code = t - 1) of the 10 inputs of a byte pair given as
// `pair` (first byte in bits 0-7). Each digit sits at a fixed position: a multiply, a shift and
// a multiply-add each, no per-input branches.
BONSAI_FN BonsaiDigits10 bonsai_ternary_digits10(uint32_t pair) {
  BonsaiDigits10 out;
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    uint32_t v = (pair >> (8 * b)) & 0xffu;
#pragma unroll
    for (int j = 0; j < 5; ++j) {
      const uint32_t q = (v * 171u) >> 9;  // v / 3, exact for v <= 255
      out.t[5 * b + j] = float(v - 3u * q);
      v = q;
    }
  }
  return out;
}

#endif  // BONSAI_DECODE_H
