// Hopper-only helpers of packed_wgmma.cu (appended after bonsai_decode.h and bonsai_cuda.cuh by
// mlx_bonsai/kernels.py for that kernel alone: MLX hashes every kernel's whole source on each
// launch, so the other kernels do not carry this text). Warpgroup MMA is inline PTX for sm_90a,
// which is what MLX compiles custom kernels for on compute capability 9.x.

#ifndef BONSAI_WGMMA_CUH
#define BONSAI_WGMMA_CUH

// Shared-memory matrix descriptor of a K-major tile of 128-byte rows in wgmma's 128B swizzle:
// start address / 16, leading offset 1 (unused when swizzled), 1024 bytes between 8-row groups.
// Advancing K by 16 elements inside the swizzle row is +32 bytes on the start address.
__device__ __forceinline__ uint64_t bonsai_wgmma_desc(uint32_t smem_addr) {
  return uint64_t((smem_addr & 0x3ffffu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// A compile-time bool as a type, to instantiate a generic lambda once per value.
template <bool V>
struct BonsaiBool {
  static constexpr bool value = V;
};

template <typename A, typename B>
struct BonsaiSame {
  static constexpr bool value = false;
};
template <typename A>
struct BonsaiSame<A, A> {
  static constexpr bool value = true;
};

#define BONSAI_WGMMA_RS_N128(TY)                                                            \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                              \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// d (64 x 128 fp32 per warpgroup, wgmma's fragment layout) += A (64 x 16, this thread's four
// registers of T pairs, mma.sync's A layout per warp) * B (16 x 128, K-major in shared memory,
// see bonsai_wgmma_desc). Asynchronous: wgmma.wait_group before reading d or rewriting a.
template <typename T>
__device__ __forceinline__ void bonsai_wgmma_rs(float* d, const uint32_t (&a)[4],
                                                uint64_t desc_b) {
  if constexpr (BonsaiSame<T, __nv_bfloat16>::value) {
    BONSAI_WGMMA_RS_N128("bf16");
  } else {
    BONSAI_WGMMA_RS_N128("f16");
  }
}

// Keep the compiler from moving accumulator accesses across the asm around them.
template <int NACC>
__device__ __forceinline__ void bonsai_fence_operands(float (&acc)[NACC]) {
#pragma unroll
  for (int e = 0; e < NACC; ++e) {
    asm volatile("" : "+f"(acc[e])::"memory");
  }
}

// A scale as the bits of T in both halves of a word (converted through float, rounding to
// nearest, as MLX's astype does, when the scale dtype differs).
template <typename T, typename S>
__device__ __forceinline__ uint32_t bonsai_bits2(S s) {
  uint16_t bits;
  if constexpr (BonsaiSame<T, S>::value) {
    bits = *reinterpret_cast<const uint16_t*>(&s);
  } else {
    const T v = T(float(s));
    bits = *reinterpret_cast<const uint16_t*>(&v);
  }
  return uint32_t(bits) * 0x10001u;
}

// Two binary weights (bits 0 and 1 of `bits`) as a word of two T: bit 1 -> +s, 0 -> -s, i.e.
// the scale's bits (`s2`, both halves) with the sign bit flipped where the bit is 0. Exact.
__device__ __forceinline__ uint32_t bonsai_binary_pair(uint32_t bits, uint32_t s2) {
  return s2 ^ (((~bits & 3u) * 0x40008000u) & 0x80008000u);
}

// Two ternary weights from planes (bits 0, 16: non-zero; bits 8, 24: negative; see
// packed_planes.cu) as a word of two T: 0, +s or -s. Exact.
__device__ __forceinline__ uint32_t bonsai_planes_pair(uint32_t planes, uint32_t s2) {
  const uint32_t keep = (planes & 0x00010001u) * 0xffffu;
  return (s2 & keep) ^ ((planes << 7) & 0x80008000u);
}

#endif  // BONSAI_WGMMA_CUH
