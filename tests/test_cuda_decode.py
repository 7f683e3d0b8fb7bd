"""The Hopper kernel's weight decoding, run on the CPU from the real CUDA source text.

packed_wgmma.cu cannot run here (no GPU; benchmarks/kernels.py checks it on one). What can: its
decode arithmetic. metal/packed_planes.cu (ternary base-3 -> 2-bit planes) executes thread by
thread as host C++, and the pair decoders of metal/bonsai_wgmma.cuh rebuild every weight of a
row from the words that packed_wgmma.cu feeds them (per k16 step, lane t: pairs (2t, 2t+1) and
(2t+8, 2t+9)); the result must equal the reference unpack bit for bit.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_bonsai import kernels

HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
#define __device__
#define __forceinline__ inline
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct dim3 { unsigned x, y, z; };
struct Shape { int v[2]; int operator[](int i) const { return v[i]; } };
@HEADERS@
static void planes_thread(const uint8_t* weight, Shape weight_shape, uint32_t* planes,
                          dim3 blockIdx, dim3 blockDim, dim3 threadIdx) {
@PLANES@
}
// stdin: kind (0 binary, 1 ternary), N, K, the N scale bit patterns (uint16), the packed row
// bytes; stdout: the N x K decoded weights as uint16 bit patterns.
int main() {
  int kind, n, k;
  if (scanf("%d %d %d", &kind, &n, &k) != 3) return 1;
  std::vector<uint32_t> s2(n);
  for (int r = 0; r < n; ++r) { unsigned v; scanf("%u", &v); s2[r] = v * 0x10001u; }
  const int row_bytes = kind ? k / 128 * 26 : k / 8;
  std::vector<uint8_t> packed(size_t(n) * row_bytes);
  for (auto& b : packed) { unsigned v; scanf("%u", &v); b = uint8_t(v); }
  std::vector<uint32_t> words(size_t(n) * (k / 16));  // ternary: planes; binary: the words
  if (kind) {
    const Shape shape{{n, row_bytes}};
    const unsigned threads = unsigned(n) * unsigned(k / 128);  // one per group, as launched
    for (unsigned i = 0; i < threads; ++i) {
      planes_thread(packed.data(), shape, words.data(), dim3{i / 256, 0, 0}, dim3{256, 1, 1},
                    dim3{i % 256, 0, 0});
    }
  } else {
    for (size_t i = 0; i < size_t(n) * (k / 32); ++i) {
      words[i] = packed[4 * i] | packed[4 * i + 1] << 8 | packed[4 * i + 2] << 16 |
                 uint32_t(packed[4 * i + 3]) << 24;
    }
  }
  std::vector<uint16_t> out(size_t(n) * k);
  for (int r = 0; r < n; ++r) {
    for (int k16 = 0; k16 < k / 16; ++k16) {
      for (int t = 0; t < 4; ++t) {
        uint32_t lo, hi;  // pairs (2t, 2t+1) and (2t+8, 2t+9) of the run, as the kernel forms them
        if (kind) {
          const uint32_t word = words[size_t(r) * (k / 16) + k16];
          lo = bonsai_planes_pair(word >> t, s2[r]);
          hi = bonsai_planes_pair(word >> (t + 4), s2[r]);
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


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    gxx = shutil.which("g++")
    assert gxx, "tests/test_cuda_decode.py needs g++ to run the CUDA decode source on the CPU"
    src = (HARNESS.replace("@HEADERS@", kernels._source("bonsai_decode.h")
                           + kernels._source("bonsai_wgmma.cuh"))
           .replace("@PLANES@", kernels._source("packed_planes.cu")))
    build = tmp_path_factory.mktemp("cuda_decode")
    (build / "harness.cpp").write_text(src)
    exe = build / "harness"
    subprocess.run([gxx, "-std=c++17", "-O1", "-w", "-o", str(exe), str(build / "harness.cpp")],
                   check=True, capture_output=True, text=True)

    def decode(kind: str, weight: mx.array, scales: mx.array) -> np.ndarray:
        n, k = scales.shape[0], scales.shape[1] * 128
        rows = np.array(weight).view(np.uint8).reshape(n, -1)
        # One scale per row: the decoders see one scale word per row and stage.
        s_bits = np.array(scales[:, :1].astype(mx.bfloat16).view(mx.uint16)).reshape(-1)
        text = " ".join(map(str, [int(kind == "ternary"), n, k, *s_bits, *rows.reshape(-1)]))
        out = subprocess.run([str(exe)], input=text, check=True, capture_output=True, text=True)
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
