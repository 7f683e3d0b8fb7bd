"""CUDA weight decoding run on the CPU from the real source text: the Hopper kernel's decoders,
the GEMV's digit-word decoder and the decode to scratch.

packed_wgmma.cu cannot run here (no GPU; benchmarks/kernels.py checks it on one). What can: its
decode arithmetic. metal/packed_fields.cu (ternary base-3 -> per-lane digit words) executes
thread by thread as host C++, and the pair decoders (bonsai_wgmma.cuh's binary, bonsai_cuda.cuh's
ternary) rebuild every weight of a row from the words that packed_wgmma.cu feeds them (per k16
step, lane t: pairs (2t, 2t+1) and (2t+8, 2t+9)); the result must equal the reference unpack bit
for bit, as must the codes the GEMV reads from held digit words. packed_decode.cu runs whole,
thread by thread, over the launch the dispatch makes, with the same bit-for-bit check. The wgmma
asm statements, as the preprocessor expands bonsai_wgmma.cuh's macros, must name every operand
once, in the order PTX reads them.
"""

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_bonsai import kernels, packing

# What CUDA source needs to compile as host C++: device qualifiers, the 16-bit types (bit
# patterns only), launch coordinates and MLX's shape parameter.
PRELUDE = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#define __device__
#define __forceinline__ inline
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct dim3 { unsigned x, y, z; };
struct Shape { int v[2]; int operator[](int i) const { return v[i]; } };
struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
// PTX prmt (default mode), which bonsai_wgmma.cuh issues as inline asm on the GPU: byte i of the
// result is byte c[4i+2:4i] of b:a, its top bit copied to all 8 bits if c[4i+3] is set.
inline uint32_t bonsai_prmt(uint32_t a, uint32_t b, uint32_t c) {
  const uint64_t v = a | uint64_t(b) << 32;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nibble = c >> (4 * i) & 15u;
    uint32_t byte = uint32_t(v >> (8 * (nibble & 7u))) & 0xffu;
    if (nibble & 8u) byte = byte & 0x80u ? 0xffu : 0u;
    r |= byte << (8 * i);
  }
  return r;
}
"""

# What bonsai_cuda.cuh needs besides PRELUDE.
CUDA_SHIMS = r"""
struct __nv_bfloat162 { uint16_t lo, hi; };
struct __half2 { uint16_t lo, hi; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint16_t bf16_rn(float f) {  // round to nearest even, as __floats2bfloat162_rn (no NaN here)
  uint32_t u;
  memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {bf16_rn(lo), bf16_rn(hi)};
}
inline __half2 __floats2half2_rn(float, float) { return {0, 0}; }  // not instantiated
inline uint32_t __cvta_generic_to_shared(const void*) { return 0; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
"""

HARNESS = PRELUDE + CUDA_SHIMS + r"""
@HEADERS@
static void fields_thread(const uint8_t* weight, Shape weight_shape, uint32_t* fields,
                          dim3 blockIdx, dim3 blockDim, dim3 threadIdx) {
@FIELDS@
}
// stdin: kind (0 binary, 1 ternary, 2 ternary: print the pass's words), N, K, the N scale bit
// patterns (uint16), the packed row bytes; stdout: the N x K decoded weights as uint16 bit
// patterns (2: the words).
int main() {
  int kind, n, k;
  if (scanf("%d %d %d", &kind, &n, &k) != 3) return 1;
  std::vector<uint32_t> s2(n);
  for (int r = 0; r < n; ++r) { unsigned v; scanf("%u", &v); s2[r] = v * 0x10001u; }
  const int row_bytes = kind ? k / 128 * 26 : k / 8;
  std::vector<uint8_t> packed(size_t(n) * row_bytes);
  for (auto& b : packed) { unsigned v; scanf("%u", &v); b = uint8_t(v); }
  std::vector<uint32_t> words(size_t(n) * (k / (kind ? 16 : 32)));  // digit words / the words
  if (kind) {
    const Shape shape{{n, row_bytes}};
    const unsigned threads = unsigned(n) * unsigned(k / 128);  // one per group, as launched
    for (unsigned i = 0; i < threads; ++i) {
      fields_thread(packed.data(), shape, words.data(), dim3{i / 256, 0, 0}, dim3{256, 1, 1},
                    dim3{i % 256, 0, 0});
    }
  } else {
    for (size_t i = 0; i < size_t(n) * (k / 32); ++i) {
      words[i] = packed[4 * i] | packed[4 * i + 1] << 8 | packed[4 * i + 2] << 16 |
                 uint32_t(packed[4 * i + 3]) << 24;
    }
  }
  if (kind == 2) {  // the pass's words themselves
    for (uint32_t w : words) printf("%u\n", w);
    return 0;
  }
  std::vector<uint16_t> out(size_t(n) * k);
  for (int r = 0; r < n; ++r) {
    for (int k16 = 0; k16 < k / 16; ++k16) {
      for (int t = 0; t < 4; ++t) {
        uint32_t lo, hi;  // pairs (2t, 2t+1) and (2t+8, 2t+9) of the run, as the kernel forms them
        if (kind) {  // stage k16 / 4, run k16 % 4: lane t's word t of the stage
          const uint32_t word = words[size_t(r) * (k / 16) + k16 / 4 * 4 + t];
          bonsai_ternary_pairs(word, k16 % 4, s2[r] ^ BONSAI_TERNARY_SA, lo, hi);
        } else {
          const uint32_t bits = words[size_t(r) * (k / 32) + k16 / 2] >> (16 * (k16 % 2) + 2 * t);
          lo = bonsai_binary_pair(bits, s2[r]);
          hi = bonsai_binary_pair(bits >> 8, s2[r]);
        }
        const size_t at = size_t(r) * k + k16 * 16 + 2 * t;
        out[at] = lo & 0xffff; out[at + 1] = lo >> 16; out[at + 8] = hi & 0xffff;
        out[at + 9] = hi >> 16;
      }
    }
  }
  for (uint16_t v : out) printf("%u\n", v);
  return 0;
}
"""


def gxx() -> str:
    """The g++ that builds and preprocesses CUDA sources as host C++ here."""
    path = shutil.which("g++")
    assert path, "tests/test_cuda_decode.py needs g++ to run CUDA sources on the CPU"
    return path


def compile_harness(tmp_path_factory, harness: str, **parts: str) -> Path:
    """The C++ `harness` with each @NAME@ replaced by the comment-stripped text of the kernel
    source files parts[NAME] (space-separated), built by g++."""
    for name, files in parts.items():
        harness = harness.replace(f"@{name}@", "".join(map(kernels._source, files.split())))
    build = tmp_path_factory.mktemp("cuda_harness")
    (build / "harness.cpp").write_text(harness)
    exe = build / "harness"
    subprocess.run([gxx(), "-std=c++17", "-O1", "-w", "-o", str(exe), str(build / "harness.cpp")],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    exe = compile_harness(tmp_path_factory, HARNESS,
                          HEADERS="bonsai_decode.h bonsai_cuda.cuh bonsai_wgmma.cuh",
                          FIELDS="packed_fields.cu")

    def decode(kind: str, weight: mx.array, scales: mx.array) -> np.ndarray:
        """Decoded weights [n, k] as bit patterns; kind "fields": the ternary pass's words."""
        n, k = scales.shape[0], scales.shape[1] * 128
        rows = np.array(weight).view(np.uint8).reshape(n, -1)
        # One scale per row: the decoders see one scale word per row and stage.
        s_bits = np.array(scales[:, :1].astype(mx.bfloat16).view(mx.uint16)).reshape(-1)
        code = {"binary": 0, "ternary": 1, "fields": 2}[kind]
        text = " ".join(map(str, [code, n, k, *s_bits, *rows.reshape(-1)]))
        out = subprocess.run([str(exe)], input=text, check=True, capture_output=True, text=True)
        if kind == "fields":
            return np.array(out.stdout.split(), dtype=np.uint32).reshape(n, -1)
        return np.array(out.stdout.split(), dtype=np.uint16).reshape(n, k)

    return decode


@pytest.mark.parametrize("kind", kernels.KINDS)
def test_wgmma_decode_equals_the_reference_unpack(decoder, kind):
    n, k = 24, 3 * 128
    weight, scales = kernels.random_packed(kind, n, k, key=mx.random.key(5))
    # Every group of a row gets the row's first scale: the harness passes one per row (the
    # kernel reloads it per 64-input stage; that load is plain indexing, covered on the GPU).
    scales = mx.repeat(scales[:, :1], k // 128, axis=1)
    if kind == "ternary":  # make sure zeros, both signs and the last byte's digits all occur
        weight = mx.concatenate([mx.full((1, weight.shape[1]), 121, mx.uint8), weight[1:]])
    unpack = kernels.unpack_binary if kind == "binary" else kernels.unpack_ternary
    want = np.array(unpack(weight, scales, mx.bfloat16).view(mx.uint16))
    got = decoder(kind, weight, scales)
    assert np.array_equal(got, want)
    if kind == "ternary":  # zero weights decode to +0, not -0, exactly as the reference
        assert (got == 0).any() and not (got == 0x8000).any()


def test_ternary_pass_writes_the_documented_layout(decoder):
    """The words of metal/packed_fields.cu are those of its documented layout, which the
    reference (packing.pack_trit_words) and the checks on the GPU also produce."""
    n, k = 7, 5 * 128
    weight, scales = kernels.random_packed("ternary", n, k, key=mx.random.key(9))
    trits = packing.unpack_trits(np.array(weight))
    assert np.array_equal(decoder("fields", weight, scales), packing.pack_trit_words(trits))


DECODE_HARNESS = PRELUDE + CUDA_SHIMS + r"""
@HEADERS@
template <typename T, typename S, bool TERNARY, typename P>
static void decode_thread(const P* weight, const S* scales, Shape scales_shape, T* dense,
                          dim3 blockIdx, dim3 blockDim, dim3 threadIdx) {
@BODY@
}
template <bool TERNARY, typename P>
static void run(const std::vector<uint8_t>& packed, const std::vector<float>& scales, int n,
                int k, unsigned blocks, unsigned block, std::vector<uint16_t>& out) {
  const P* weight = reinterpret_cast<const P*>(packed.data());
  const Shape shape{{n, k / 128}};
  __nv_bfloat16* dense = reinterpret_cast<__nv_bfloat16*>(out.data());
  for (unsigned b = 0; b < blocks; ++b) {
    for (unsigned t = 0; t < block; ++t) {
      decode_thread<__nv_bfloat16, float, TERNARY, P>(weight, scales.data(), shape, dense,
                                                      dim3{b, 0, 0}, dim3{block, 1, 1},
                                                      dim3{t, 0, 0});
    }
  }
}
// stdin: kind (0 binary, 1 ternary), N, K, blocks, threads a block, the N * K / 128 scales (float
// bits), the packed row bytes; stdout: dense bf16 bit patterns (0x7fc1 where nothing was written).
int main() {
  int kind, n, k;
  unsigned blocks, block;
  if (scanf("%d %d %d %u %u", &kind, &n, &k, &blocks, &block) != 5) return 1;
  std::vector<float> scales(size_t(n) * (k / 128));
  for (auto& s : scales) { uint32_t v; scanf("%u", &v); memcpy(&s, &v, 4); }
  std::vector<uint8_t> packed(size_t(n) * (kind ? k / 128 * 26 : k / 8) + 16);
  for (size_t i = 0; i + 16 < packed.size(); ++i) {  // 16 spare zero bytes: no overrun
    unsigned v;
    scanf("%u", &v);
    packed[i] = uint8_t(v);
  }
  std::vector<uint16_t> out(size_t(n) * k, 0x7fc1);
  if (kind) run<true, uint8_t>(packed, scales, n, k, blocks, block, out);
  else run<false, uint32_t>(packed, scales, n, k, blocks, block, out);
  for (uint16_t v : out) printf("%u\n", v);
  return 0;
}
"""


@pytest.fixture(scope="module")
def scratch_decoder(tmp_path_factory):
    exe = compile_harness(tmp_path_factory, DECODE_HARNESS,
                          HEADERS="bonsai_decode.h bonsai_cuda.cuh", BODY="packed_decode.cu")

    def decode(kind: str, weight: mx.array, scales: mx.array, grid: int, group: int) -> np.ndarray:
        """packed_decode.cu run thread by thread over the launch MLX makes of (grid, group):
        min(group, grid) threads a block, ceil(grid / that) blocks."""
        n, k = scales.shape[0], scales.shape[1] * 128
        block = min(group, grid)
        blocks = -(-grid // block)
        rows = np.array(weight).view(np.uint8).reshape(-1)
        s_bits = np.array(scales.astype(mx.float32)).view(np.uint32).reshape(-1)
        text = " ".join(map(str, [int(kind == "ternary"), n, k, blocks, block, *s_bits, *rows]))
        out = subprocess.run([str(exe)], input=text, check=True, capture_output=True, text=True)
        return np.array(out.stdout.split(), dtype=np.uint16).reshape(n, k)

    return decode


def decode_launch(kind: str, weight: mx.array, scales: mx.array) -> tuple[int, int]:
    """(grid, threadgroup) of the launch KernelSet.decode makes on CUDA for these rows."""
    seen = {}

    def factory(**_):
        def launch(**args):
            seen.update(args)
            return [mx.zeros(args["output_shapes"][0], args["output_dtypes"][0])]
        return launch

    n, k = scales.shape[0], scales.shape[1] * kernels.GROUP_SIZE
    kernels.KernelSet("cuda", factory).decode(n, k, mx.bfloat16, scales.dtype,
                                              kind == "ternary")(weight, scales)
    return seen["grid"][0], seen["threadgroup"][0]


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("n, k", [(3, 128), (5, 640), (202, 384)])
def test_scratch_decode_writes_every_weight_exactly(scratch_decoder, kind, n, k):
    """The CUDA decode to scratch (binary: two 8-weight chunks a thread, spread over the warp),
    over exactly the launch the dispatch makes: every weight written, bit-equal to the reference
    unpack; (3, 128) is smaller than one threadgroup, (202, 384) ends inside a warp."""
    weight, scales = kernels.random_packed(kind, n, k, key=mx.random.key(7))
    if kind == "ternary":  # zeros, both signs and the last byte's digits all occur
        weight = mx.concatenate([mx.full((1, weight.shape[1]), 121, mx.uint8), weight[1:]])
    grid, group = decode_launch(kind, weight, scales)
    got = scratch_decoder(kind, weight, scales, grid, group)
    unpack = kernels.unpack_binary if kind == "binary" else kernels.unpack_ternary
    want = np.array(unpack(weight, scales, mx.bfloat16).view(mx.uint16))
    assert not (got == 0x7FC1).any(), "weights left unwritten"
    assert np.array_equal(got, want)


def wgmma_asm_statements() -> list[str]:
    """The wgmma asm statements of metal/bonsai_wgmma.cuh as g++'s preprocessor expands them
    (adjacent string literals joined, accumulator indices evaluated, whitespace removed)."""
    text = PRELUDE + kernels._source("bonsai_wgmma.cuh")
    out = subprocess.run([gxx(), "-E", "-P", "-x", "c++", "-"], input=text, check=True,
                         capture_output=True, text=True).stdout
    out = re.sub(r'"\s*"', "", out)
    out = re.sub(r"d\[([0-9 +]+)\]", lambda m: f"d[{sum(map(int, m[1].split('+')))}]", out)
    return re.findall(r"asm volatile\((\"\{\\n\.reg \.pred p;.*?\"\(1\))\)", out, re.S)


def test_wgmma_asm_names_each_operand_once_in_order():
    """The six MMAs (n128, n192, n256; bf16, f16) as PTX names them: the N / 2 accumulators %0 ..,
    then the four A registers, the B descriptor and the scale-d flag; operand i of the
    accumulator list is d[i]. A wrong number here multiplies into the wrong registers."""
    found = {}
    for stmt in wgmma_asm_statements():
        shape = re.search(r"m64n(\d+)k16\.f32\.(\w+)\.", stmt)
        n, ty = int(shape[1]), shape[2]
        half = n // 2
        regs = re.search(r"\{(%[0-9, %]+)\}, \{(%[0-9, %]+)\}, (%\d+), p", stmt)
        assert regs[1].split(", ") == [f"%{i}" for i in range(half)]
        assert regs[2].split(", ") == [f"%{half + i}" for i in range(4)]
        assert regs[3] == f"%{half + 4}" and f"setp.ne.b32 p, %{half + 5}, 0" in stmt
        outputs = re.findall(r'"\+f"\(d\[(\d+)\]\)', stmt)
        assert outputs == [str(i) for i in range(half)]
        inputs = re.sub(r"\s", "", stmt.rsplit(":", 1)[1])
        assert inputs == '"r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]),"l"(desc_b),"r"(1)'
        found[(n, ty)] = found.get((n, ty), 0) + 1
    assert found == {(n, ty): 1 for n in (128, 192, 256) for ty in ("bf16", "f16")}


WORDS_HARNESS = PRELUDE + CUDA_SHIMS + r"""
@HEADERS@
// stdin: N, K, the N * K / 16 digit words; stdout: the codes of every run, as the GEMV reads
// them (bonsai_words_codes16 of the run's stage).
int main() {
  int n, k;
  if (scanf("%d %d", &n, &k) != 2) return 1;
  std::vector<uint32_t> words(size_t(n) * (k / 16));
  for (auto& w : words) scanf("%u", &w);
  for (int r = 0; r < n; ++r) {
    for (int run = 0; run < k / 16; ++run) {
      const uint32_t* s = &words[size_t(r) * (k / 16) + run / 4 * 4];
      const BonsaiCodes16 codes = bonsai_words_codes16(uint4{s[0], s[1], s[2], s[3]}, run % 4);
      for (float c : codes.c) printf("%d\n", int(c));
    }
  }
  return 0;
}
"""


def test_gemv_reads_digit_words_as_the_reference(tmp_path_factory):
    """The CUDA GEMV's decoder of ternary digit words (bonsai_words_codes16) gives every input
    of a row the code the reference unpack gives it."""
    exe = compile_harness(tmp_path_factory, WORDS_HARNESS,
                          HEADERS="bonsai_decode.h bonsai_cuda.cuh")
    n, k = 5, 3 * 128
    weight, scales = kernels.random_packed("ternary", n, k, key=mx.random.key(11))
    words = np.array(kernels._words_of(weight))
    text = " ".join(map(str, [n, k, *words.reshape(-1)]))
    out = subprocess.run([str(exe)], input=text, check=True, capture_output=True, text=True)
    codes = np.array(out.stdout.split(), dtype=np.int64).reshape(n, k)
    want = np.array(kernels.unpack_ternary(weight, mx.ones_like(scales), mx.float32))
    assert np.array_equal(codes, want) and {-1, 0, 1} <= set(codes.reshape(-1))
