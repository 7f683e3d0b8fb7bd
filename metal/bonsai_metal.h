// Metal-only preamble of the bonsai kernels (prepended to bonsai_decode.h by mlx_bonsai/kernels.py).
#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
using namespace metal;
