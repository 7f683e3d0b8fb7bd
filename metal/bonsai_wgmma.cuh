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

// wgmma m64nNk16 (N = 128 | 192 | 256) with A from registers: d (64 x N fp32 per warpgroup,
// wgmma's fragment layout: d[4 b + e] is column 8 b + 2 t + e % 2, row g + 8 (e / 2)) += A (64 x
// 16, this thread's four registers of T pairs, mma.sync's A layout per warp) * B (16 x N, K-major
// in shared memory, see bonsai_wgmma_desc). The asm names the N / 2 accumulators first (%0 ..),
// then a[0..3], desc_b and the scale-d flag. Asynchronous: wgmma.wait_group before reading d or
// rewriting a.
#define BONSAI_D8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define BONSAI_D32(i) BONSAI_D8(i), BONSAI_D8(i + 8), BONSAI_D8(i + 16), BONSAI_D8(i + 24)
#define BONSAI_D64(i) BONSAI_D32(i), BONSAI_D32(i + 32)
#define BONSAI_REGS_0 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63"
#define BONSAI_REGS_64 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define BONSAI_REGS_96 \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, " \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, " \
  "%126, %127"
#define BONSAI_WGMMA_RS(SHAPE, TY, REGS, A0, PRED, ...)                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                               \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " {" REGS "}, " A0      \
               ", p, 1, 1, 0;\n}\n"                                                             \
               : __VA_ARGS__                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
// The same MMA for T = bf16 or f16.
#define BONSAI_WGMMA_T(SHAPE, REGS, A0, PRED, ...)                  \
  if constexpr (BonsaiSame<T, __nv_bfloat16>::value) {              \
    BONSAI_WGMMA_RS(SHAPE, "bf16", REGS, A0, PRED, __VA_ARGS__);    \
  } else {                                                          \
    BONSAI_WGMMA_RS(SHAPE, "f16", REGS, A0, PRED, __VA_ARGS__);     \
  }

template <typename T, int N>
__device__ __forceinline__ void bonsai_wgmma_rs(float* d, const uint32_t (&a)[4],
                                                uint64_t desc_b) {
  static_assert(N == 128 || N == 192 || N == 256, "wgmma width");
  if constexpr (N == 128) {
    BONSAI_WGMMA_T("m64n128k16", BONSAI_REGS_0, "{%64, %65, %66, %67}, %68", "%69",
                   BONSAI_D64(0));
  } else if constexpr (N == 192) {
    BONSAI_WGMMA_T("m64n192k16", BONSAI_REGS_0 ", " BONSAI_REGS_64, "{%96, %97, %98, %99}, %100",
                   "%101", BONSAI_D64(0), BONSAI_D32(64));
  } else {
    BONSAI_WGMMA_T("m64n256k16", BONSAI_REGS_0 ", " BONSAI_REGS_64 ", " BONSAI_REGS_96,
                   "{%128, %129, %130, %131}, %132", "%133", BONSAI_D64(0), BONSAI_D64(64));
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

#endif  // BONSAI_WGMMA_CUH
