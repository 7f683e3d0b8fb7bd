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

#endif  // BONSAI_WGMMA_CUH
