// CUDA-only helpers of the bonsai kernels (appended after bonsai_decode.h by mlx_bonsai/kernels.py;
// MLX's cuda_kernel has already included cuda_bf16.h / cuda_fp16.h). Tensor-core access is inline
// PTX (ldmatrix + mma.sync m16n8k16, sm_80 and newer), so no CUDA header beyond MLX's is needed.

#ifndef BONSAI_CUDA_CUH
#define BONSAI_CUDA_CUH

// Two floats -> one 32-bit word of two T (lo in the low half), for 16-byte shared/global stores.
template <typename T>
__device__ __forceinline__ uint32_t bonsai_pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t bonsai_pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t bonsai_pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// dst[0..16) = T(codes * scale): 16-byte stores (dst 32- or 64-byte aligned).
template <typename T>
__device__ __forceinline__ void bonsai_store16(T* dst, const BonsaiCodes16& codes, float scale) {
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    w[j] = bonsai_pack2<T>(codes.c[2 * j] * scale, codes.c[2 * j + 1] * scale);
  }
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = make_uint4(w[0], w[1], w[2], w[3]);
  d[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

template <>
__device__ __forceinline__ void bonsai_store16<float>(
    float* dst, const BonsaiCodes16& codes, float scale) {
  float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    d[q] = make_float4(codes.c[4 * q] * scale, codes.c[4 * q + 1] * scale,
                       codes.c[4 * q + 2] * scale, codes.c[4 * q + 3] * scale);
  }
}

// dst[0..8) = T(+-scale): bit j of `bits` set -> +scale, clear -> -scale (binary codes; the same
// values as bonsai_store16 of bonsai_binary_codes16). One 16-byte store, two for float.
template <typename T>
__device__ __forceinline__ void bonsai_store8(T* dst, uint32_t bits, float scale) {
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    v[j] = ((bits >> j) & 1u) ? scale : -scale;
  }
  if constexpr (sizeof(T) == 4) {
    float4* d = reinterpret_cast<float4*>(dst);
    d[0] = make_float4(v[0], v[1], v[2], v[3]);
    d[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = bonsai_pack2<T>(v[2 * j], v[2 * j + 1]);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// out[0..16) = float(src[0..16)); 16-byte loads when `vec` (src then 16-byte aligned).
template <typename T>
__device__ __forceinline__ void bonsai_load16(const T* src, float* out, bool vec) {
  if (vec) {
    const uint4* p = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint4 v = p[q];
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const T* pair = reinterpret_cast<const T*>(&w[e]);
        out[8 * q + 2 * e] = float(pair[0]);
        out[8 * q + 2 * e + 1] = float(pair[1]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      out[j] = float(src[j]);
    }
  }
}

template <>
__device__ __forceinline__ void bonsai_load16<float>(const float* src, float* out, bool vec) {
  if (vec) {
    const float4* p = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 v = p[q];
      out[4 * q] = v.x;
      out[4 * q + 1] = v.y;
      out[4 * q + 2] = v.z;
      out[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      out[j] = src[j];
    }
  }
}

// PTX prmt, default mode: byte i of the result is byte c[4i+2:4i] of b:a (sign-replicated if
// c[4i+3]); only c's low 16 bits are read. Not __byte_perm, which masks c with 0x7777 first: an
// instruction more per permute, and our selectors never set bit 3. (tests/test_cuda_decode.py
// supplies a host version.)
#ifdef __CUDA_ARCH__
__device__ __forceinline__ uint32_t bonsai_prmt(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
#endif

// A lane's two pairs of ternary weights of run `run` (0-3) of a stage (inputs 2t, 2t+1 and
// 2t+8, 2t+9) from its stage word (16 base-3 digits of 2 bits, see packed_fields.cu) as words of
// two T: 0, +s or -s, copied byte by byte. The run's four digits are masked into the low bits of
// four nibbles; a permute through the table 0x00104432 turns each digit into the selectors of
// its output half (digit 0: bytes 2, 3 of sa, -s; 1: byte 4, i.e. of the zero register, 0;
// 2: bytes 0, 1, +s); a second permute per pair applies two selectors. `sa` holds the scale's
// bytes s_lo, s_hi, s_lo, s_hi ^ 0x80: the binary pairs' scale word ^ BONSAI_TERNARY_SA, which
// negates its high half. Exact; zero is +0.
#define BONSAI_TERNARY_SA 0x80000000u
__device__ __forceinline__ void bonsai_ternary_pairs(uint32_t word, int run, uint32_t sa,
                                                     uint32_t& lo, uint32_t& hi) {
  const uint32_t digits = (word >> (16 * (run / 2) + 2 * (run % 2))) & 0x3333u;
  const uint32_t sel = bonsai_prmt(0x00104432u, 0u, digits);
  lo = bonsai_prmt(sa, 0u, sel);
  hi = bonsai_prmt(sa, 0u, sel >> 16);
}

// Codes of run `run` (0-3) of a 64-input stage of ternary digit words (the GEMV's unit): the
// pairs that wgmma lane q forms from word q (bonsai_ternary_pairs, with 1.0 as the scale), i.e.
// inputs 2q, 2q+1, 2q+8, 2q+9 of the run, as bf16 codes widened to float (bf16 -> float: the
// bits moved up 16). About 2.3 instructions an input; exact.
__device__ __forceinline__ BonsaiCodes16 bonsai_words_codes16(uint4 stage, int run) {
  const uint32_t words[4] = {stage.x, stage.y, stage.z, stage.w};
  BonsaiCodes16 out;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t lo, hi;
    bonsai_ternary_pairs(words[q], run, 0x3f803f80u ^ BONSAI_TERNARY_SA, lo, hi);  // bf16 1.0
    out.c[2 * q] = __uint_as_float(lo << 16);
    out.c[2 * q + 1] = __uint_as_float(lo & 0xffff0000u);
    out.c[2 * q + 8] = __uint_as_float(hi << 16);
    out.c[2 * q + 9] = __uint_as_float(hi & 0xffff0000u);
  }
  return out;
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void bonsai_ldmatrix_x4(uint32_t* r, const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c (16x8, fp32) += a (16x16, row) * b (16x8, col), operands in T.
template <typename T>
__device__ __forceinline__ void bonsai_mma16816(float* c, const uint32_t* a, const uint32_t* b);

template <>
__device__ __forceinline__ void bonsai_mma16816<__nv_bfloat16>(
    float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void bonsai_mma16816<__half>(
    float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ float bonsai_warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

#endif  // BONSAI_CUDA_CUH
