// The subset of the Metal Shading Language (and of MLX's Metal preamble) that kernels may use
// under the harness, written for g++ from Apple's MSL specification. Anything not defined here
// fails to compile; known MSL features that are deliberately absent fail with a static_assert
// that names them (see the end of this file). README.md lists what is covered.
// (An include guard, not #pragma once: it must also hold when the header comes precompiled.)
#ifndef MSLH_SHIM_H
#define MSLH_SHIM_H

#include <bit>

#include "msl_runtime.h"

namespace metal {

template <class...>
inline constexpr bool kUnsupported = false;

// ---------------------------------------------------------------------------------------------
// half (IEEE binary16) and bfloat (bfloat16): stored as bits; every operation is done in float
// and rounded once to nearest-even, which is the correctly rounded result for + - * / sqrt.
// ---------------------------------------------------------------------------------------------
namespace detail {

constexpr uint16_t f32_to_f16(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (ax <= 0x33000000u) return uint16_t(sign);            // <= 2^-25 rounds to zero
  uint32_t e = ax >> 23;
  uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  uint32_t h, rem, halfway;
  if (e < 113) {  // binary16 subnormal: count units of 2^-24
    uint32_t shift = 126 - e;
    h = m >> shift;
    rem = m & ((1u << shift) - 1);
    halfway = 1u << (shift - 1);
  } else {
    h = ((e - 112) << 10) | ((m >> 13) & 0x3ffu);
    rem = m & 0x1fffu;
    halfway = 0x1000u;
  }
  if (rem > halfway || (rem == halfway && (h & 1))) h++;
  return uint16_t(sign | h);
}

constexpr float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {
      uint32_t sh = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++sh;
      }
      bits = sign | ((113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  return std::bit_cast<float>(bits);
}

constexpr uint16_t f32_to_bf16(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

constexpr float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

struct from_bits_t {};

}  // namespace detail

#define MSLH_LOWP_TYPE(NAME, TO_BITS, TO_FLOAT)                          \
  struct NAME {                                                          \
    uint16_t bits_;                                                      \
    NAME() = default;                                                    \
    constexpr NAME(detail::from_bits_t, uint16_t b) : bits_(b) {}        \
    constexpr NAME(float f) : bits_(detail::TO_BITS(f)) {}               \
    constexpr NAME(double d) : bits_(detail::TO_BITS(float(d))) {}       \
    template <class I>                                                   \
      requires std::is_integral_v<I>                                     \
    constexpr NAME(I i) : bits_(detail::TO_BITS(float(i))) {}            \
    constexpr operator float() const { return detail::TO_FLOAT(bits_); } \
    constexpr NAME operator-() const {                                   \
      return NAME(detail::from_bits_t{}, uint16_t(bits_ ^ 0x8000u));     \
    }                                                                    \
    constexpr NAME operator+() const { return *this; }                   \
    template <class B>                                                   \
    NAME& operator+=(B b) {                                              \
      return *this = NAME(*this + b);                                    \
    }                                                                    \
    template <class B>                                                   \
    NAME& operator-=(B b) {                                              \
      return *this = NAME(*this - b);                                    \
    }                                                                    \
    template <class B>                                                   \
    NAME& operator*=(B b) {                                              \
      return *this = NAME(*this * b);                                    \
    }                                                                    \
    template <class B>                                                   \
    NAME& operator/=(B b) {                                              \
      return *this = NAME(*this / b);                                    \
    }                                                                    \
    NAME& operator++() { return *this = NAME(float(*this) + 1.0f); }     \
    NAME& operator--() { return *this = NAME(float(*this) - 1.0f); }     \
  };                                                                     \
  static_assert(sizeof(NAME) == 2 && std::is_trivially_copyable_v<NAME>);

MSLH_LOWP_TYPE(half, f32_to_f16, f16_to_f32)
MSLH_LOWP_TYPE(bfloat, f32_to_bf16, bf16_to_f32)
#undef MSLH_LOWP_TYPE

template <class T>
inline constexpr bool is_lowp_v = std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
template <class T>
concept Scalar = std::is_arithmetic_v<T> || is_lowp_v<T>;

// MSL's usual arithmetic conversions with half/bfloat: an integer converts to the low-precision
// type, float wins over it, half and bfloat do not mix. MSL has no double: a double operand
// (an unsuffixed literal) counts as float.
template <class A, class B>
using lowp_result_t = std::conditional_t<
    std::is_same_v<A, B>, A,
    std::conditional_t<is_lowp_v<A> && std::is_integral_v<B>, A,
                       std::conditional_t<is_lowp_v<B> && std::is_integral_v<A>, B,
                                          std::conditional_t<std::is_floating_point_v<A> ||
                                                                 std::is_floating_point_v<B>,
                                                             float, void>>>>;
template <class A, class B>
concept LowpPair = Scalar<A> && Scalar<B> && (is_lowp_v<A> || is_lowp_v<B>) &&
                   !std::is_void_v<lowp_result_t<A, B>>;

#define MSLH_LOWP_BINOP(OP)                             \
  template <class A, class B>                           \
    requires LowpPair<A, B>                             \
  constexpr lowp_result_t<A, B> operator OP(A a, B b) { \
    return lowp_result_t<A, B>(float(a) OP float(b));   \
  }
MSLH_LOWP_BINOP(+)
MSLH_LOWP_BINOP(-)
MSLH_LOWP_BINOP(*)
MSLH_LOWP_BINOP(/)
#undef MSLH_LOWP_BINOP
#define MSLH_LOWP_CMP(OP)                \
  template <class A, class B>            \
    requires LowpPair<A, B>              \
  constexpr bool operator OP(A a, B b) { \
    return float(a) OP float(b);         \
  }
MSLH_LOWP_CMP(==)
MSLH_LOWP_CMP(!=)
MSLH_LOWP_CMP(<)
MSLH_LOWP_CMP(<=)
MSLH_LOWP_CMP(>)
MSLH_LOWP_CMP(>=)
#undef MSLH_LOWP_CMP

// ---------------------------------------------------------------------------------------------
// Vectors vec<T, N>, N = 2, 3, 4. Sizes are MSL's (a 3-vector occupies 4 elements); alignment is
// relaxed to the scalar's so buffers can sit flush against a guard page (see README).
// ---------------------------------------------------------------------------------------------
template <class T, int N>
struct vec_storage;
template <class T>
struct vec_storage<T, 2> {
  union {
    T v[2];
    struct {
      T x, y;
    };
  };
};
template <class T>
struct vec_storage<T, 3> {
  union {
    T v[3];
    struct {
      T x, y, z;
    };
    T padded_[4];
  };
};
template <class T>
struct vec_storage<T, 4> {
  union {
    T v[4];
    struct {
      T x, y, z, w;
    };
  };
};

template <class T, int N>
struct vec;

template <class A>
struct components : std::integral_constant<int, 1> {};
template <class T, int N>
struct components<vec<T, N>> : std::integral_constant<int, N> {};

template <class T, int N>
struct vec : vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "MSL vectors have 2, 3 or 4 components");
  using value_type = T;

  vec() = default;
  // A scalar converts to a vector with every component equal to it.
  template <class S>
    requires Scalar<S>
  constexpr vec(S s) {
    for (int i = 0; i < N; ++i) this->v[i] = T(s);
  }
  // Component-wise construction from scalars and smaller vectors: float4(a.xy, z, w).
  template <class A0, class A1, class... A>
    requires(components<A0>::value + components<A1>::value + (0 + ... + components<A>::value) == N)
  constexpr vec(const A0& a0, const A1& a1, const A&... a) {
    int k = 0;
    put(k, a0);
    put(k, a1);
    (put(k, a), ...);
  }
  // Conversion between element types is explicit, as in MSL: float4(h4).
  template <class U>
    requires(!std::is_same_v<U, T>)
  constexpr explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) this->v[i] = T(o.v[i]);
  }

  T& operator[](unsigned i) {
    if (i >= unsigned(N))
      mslh::fail("vector component index %u out of range for a %d-vector", i, N);
    return this->v[i];
  }
  const T& operator[](unsigned i) const {
    if (i >= unsigned(N))
      mslh::fail("vector component index %u out of range for a %d-vector", i, N);
    return this->v[i];
  }

  template <class B>
  vec& operator+=(const B& b) {
    return *this = *this + b;
  }
  template <class B>
  vec& operator-=(const B& b) {
    return *this = *this - b;
  }
  template <class B>
  vec& operator*=(const B& b) {
    return *this = *this * b;
  }
  template <class B>
  vec& operator/=(const B& b) {
    return *this = *this / b;
  }
  template <class B>
  vec& operator%=(const B& b) {
    return *this = *this % b;
  }
  template <class B>
  vec& operator&=(const B& b) {
    return *this = *this & b;
  }
  template <class B>
  vec& operator|=(const B& b) {
    return *this = *this | b;
  }
  template <class B>
  vec& operator^=(const B& b) {
    return *this = *this ^ b;
  }
  template <class B>
  vec& operator<<=(const B& b) {
    return *this = *this << b;
  }
  template <class B>
  vec& operator>>=(const B& b) {
    return *this = *this >> b;
  }

 private:
  template <class S>
  constexpr void put(int& k, const S& s) {
    if constexpr (components<S>::value == 1) {
      this->v[k++] = T(s);
    } else {
      for (int i = 0; i < components<S>::value; ++i) this->v[k++] = T(s.v[i]);
    }
  }
};

#define MSLH_VEC_BINOP(OP)                                                  \
  template <class T, int N>                                                 \
  constexpr vec<T, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<T, N> r;                                                            \
    for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] OP b.v[i]);               \
    return r;                                                               \
  }                                                                         \
  template <class T, int N, class S>                                        \
    requires Scalar<S>                                                      \
  constexpr vec<T, N> operator OP(const vec<T, N>& a, S b) {                \
    return a OP vec<T, N>(b);                                               \
  }                                                                         \
  template <class T, int N, class S>                                        \
    requires Scalar<S>                                                      \
  constexpr vec<T, N> operator OP(S a, const vec<T, N>& b) {                \
    return vec<T, N>(a) OP b;                                               \
  }
MSLH_VEC_BINOP(+)
MSLH_VEC_BINOP(-)
MSLH_VEC_BINOP(*)
MSLH_VEC_BINOP(/)
MSLH_VEC_BINOP(%)
MSLH_VEC_BINOP(&)
MSLH_VEC_BINOP(|)
MSLH_VEC_BINOP(^)
MSLH_VEC_BINOP(<<)
MSLH_VEC_BINOP(>>)
#undef MSLH_VEC_BINOP

#define MSLH_VEC_CMP(OP)                                                       \
  template <class T, int N>                                                    \
  constexpr vec<bool, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<bool, N> r;                                                            \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];                     \
    return r;                                                                  \
  }                                                                            \
  template <class T, int N, class S>                                           \
    requires Scalar<S>                                                         \
  constexpr vec<bool, N> operator OP(const vec<T, N>& a, S b) {                \
    return a OP vec<T, N>(b);                                                  \
  }                                                                            \
  template <class T, int N, class S>                                           \
    requires Scalar<S>                                                         \
  constexpr vec<bool, N> operator OP(S a, const vec<T, N>& b) {                \
    return vec<T, N>(a) OP b;                                                  \
  }
MSLH_VEC_CMP(==)
MSLH_VEC_CMP(!=)
MSLH_VEC_CMP(<)
MSLH_VEC_CMP(<=)
MSLH_VEC_CMP(>)
MSLH_VEC_CMP(>=)
MSLH_VEC_CMP(&&)
MSLH_VEC_CMP(||)
#undef MSLH_VEC_CMP

template <class T, int N>
constexpr vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = T(-a.v[i]);
  return r;
}
template <class T, int N>
constexpr vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = T(~a.v[i]);
  return r;
}
template <class T, int N>
constexpr vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = !a.v[i];
  return r;
}

#define MSLH_VEC_TYPES(T, NAME) \
  typedef vec<T, 2> NAME##2;    \
  typedef vec<T, 3> NAME##3;    \
  typedef vec<T, 4> NAME##4;
MSLH_VEC_TYPES(float, float)
MSLH_VEC_TYPES(half, half)
MSLH_VEC_TYPES(bfloat, bfloat)
MSLH_VEC_TYPES(int, int)
MSLH_VEC_TYPES(unsigned int, uint)
MSLH_VEC_TYPES(short, short)
MSLH_VEC_TYPES(unsigned short, ushort)
MSLH_VEC_TYPES(signed char, char)
MSLH_VEC_TYPES(unsigned char, uchar)
MSLH_VEC_TYPES(long, long)
MSLH_VEC_TYPES(unsigned long, ulong)
MSLH_VEC_TYPES(bool, bool)
#undef MSLH_VEC_TYPES

// ---------------------------------------------------------------------------------------------
// Conversions and relational functions.
// ---------------------------------------------------------------------------------------------
template <class To, class From>
To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type<T>(x) needs sizeof(T) == sizeof(x)");
  return std::bit_cast<To>(x);
}

template <class T>
  requires Scalar<T>
constexpr T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
constexpr vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = c.v[i] ? b.v[i] : a.v[i];
  return r;
}
template <class T, int N>
constexpr vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) {
  return c ? b : a;
}

template <int N>
constexpr bool all(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i)
    if (!a.v[i]) return false;
  return true;
}
template <int N>
constexpr bool any(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i)
    if (a.v[i]) return true;
  return false;
}
constexpr bool all(bool a) { return a; }
constexpr bool any(bool a) { return a; }

// ---------------------------------------------------------------------------------------------
// Math. All are constrained templates so that they never clash with the C library's
// double-precision functions in the global namespace. float uses the C library's float
// function; half and bfloat compute in float and round once.
// ---------------------------------------------------------------------------------------------
template <class T>
concept Float = std::is_same_v<T, float> || is_lowp_v<T>;

#define MSLH_MATH1(NAME, EXPR)                         \
  template <class T>                                   \
    requires Float<T>                                  \
  T NAME(T x_) {                                       \
    float x = float(x_);                               \
    return T(EXPR);                                    \
  }                                                    \
  template <class T, int N>                            \
    requires Float<T>                                  \
  vec<T, N> NAME(const vec<T, N>& a) {                 \
    vec<T, N> r;                                       \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(a.v[i]); \
    return r;                                          \
  }
MSLH_MATH1(exp, std::exp(x))
MSLH_MATH1(exp2, std::exp2(x))
MSLH_MATH1(exp10, std::pow(10.0f, x))
MSLH_MATH1(log, std::log(x))
MSLH_MATH1(log2, std::log2(x))
MSLH_MATH1(log10, std::log10(x))
MSLH_MATH1(sqrt, std::sqrt(x))
MSLH_MATH1(rsqrt, 1.0f / std::sqrt(x))
MSLH_MATH1(sin, std::sin(x))
MSLH_MATH1(cos, std::cos(x))
MSLH_MATH1(tan, std::tan(x))
MSLH_MATH1(tanh, std::tanh(x))
MSLH_MATH1(sinh, std::sinh(x))
MSLH_MATH1(cosh, std::cosh(x))
MSLH_MATH1(asin, std::asin(x))
MSLH_MATH1(acos, std::acos(x))
MSLH_MATH1(atan, std::atan(x))
MSLH_MATH1(floor, std::floor(x))
MSLH_MATH1(ceil, std::ceil(x))
MSLH_MATH1(trunc, std::trunc(x))
MSLH_MATH1(round, std::round(x))
MSLH_MATH1(rint, std::nearbyint(x))
MSLH_MATH1(fabs, std::fabs(x))
MSLH_MATH1(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
MSLH_MATH1(sign, (x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x))
MSLH_MATH1(erf, std::erf(x))
#undef MSLH_MATH1

#define MSLH_MATH2(NAME, EXPR)                                 \
  template <class T>                                           \
    requires Float<T>                                          \
  T NAME(T x_, T y_) {                                         \
    float x = float(x_), y = float(y_);                        \
    return T(EXPR);                                            \
  }                                                            \
  template <class T, int N>                                    \
    requires Float<T>                                          \
  vec<T, N> NAME(const vec<T, N>& a, const vec<T, N>& b) {     \
    vec<T, N> r;                                               \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(a.v[i], b.v[i]); \
    return r;                                                  \
  }
MSLH_MATH2(pow, std::pow(x, y))
MSLH_MATH2(powr, std::pow(x, y))
MSLH_MATH2(fmin, std::fmin(x, y))
MSLH_MATH2(fmax, std::fmax(x, y))
MSLH_MATH2(fmod, std::fmod(x, y))
MSLH_MATH2(atan2, std::atan2(x, y))
MSLH_MATH2(copysign, std::copysign(x, y))
MSLH_MATH2(step, (y < x ? 0.0f : 1.0f))
#undef MSLH_MATH2

template <class T>
  requires Float<T>
T fma(T a, T b, T c) {
  return T(std::fma(float(a), float(b), float(c)));
}
template <class T, int N>
  requires Float<T>
vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = fma(a.v[i], b.v[i], c.v[i]);
  return r;
}

template <class T>
  requires Float<T>
bool isnan(T x) {
  return std::isnan(float(x));
}
template <class T>
  requires Float<T>
bool isinf(T x) {
  return std::isinf(float(x));
}
template <class T>
  requires Float<T>
bool isfinite(T x) {
  return std::isfinite(float(x));
}
template <class T>
  requires Float<T>
bool signbit(T x) {
  return std::signbit(float(x));
}

// min/max/clamp/abs for every scalar type and vectors; MSL's min/max on floats are fmin/fmax.
template <class T>
  requires Scalar<T>
constexpr T max(T a, T b) {
  if constexpr (Float<T>) {
    return T(std::fmax(float(a), float(b)));
  } else {
    return a < b ? b : a;
  }
}
template <class T>
  requires Scalar<T>
constexpr T min(T a, T b) {
  if constexpr (Float<T>) {
    return T(std::fmin(float(a), float(b)));
  } else {
    return b < a ? b : a;
  }
}
template <class T>
  requires Scalar<T>
constexpr T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T>
  requires Scalar<T>
constexpr T abs(T x) {
  if constexpr (Float<T>) {
    return T(std::fabs(float(x)));
  } else if constexpr (std::is_signed_v<T>) {
    return x < 0 ? T(-x) : x;
  } else {
    return x;
  }
}
template <class T, int N>
constexpr vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = max(a.v[i], b.v[i]);
  return r;
}
template <class T, int N>
constexpr vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = min(a.v[i], b.v[i]);
  return r;
}
template <class T, int N>
constexpr vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  return min(max(x, lo), hi);
}
template <class T, int N>
constexpr vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = abs(a.v[i]);
  return r;
}

template <class T, int N>
constexpr T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(a.v[0] * b.v[0]);
  for (int i = 1; i < N; ++i) s = T(s + a.v[i] * b.v[i]);
  return s;
}

// Integer bit functions.
template <class T>
  requires std::is_integral_v<T>
constexpr T popcount(T x) {
  return T(std::popcount(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T clz(T x) {
  return T(std::countl_zero(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T ctz(T x) {
  return T(std::countr_zero(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
T extract_bits(T x, unsigned offset, unsigned bits) {
  constexpr unsigned W = sizeof(T) * 8;
  if (offset + bits > W)
    mslh::fail("extract_bits(offset=%u, bits=%u) beyond %u bits", offset, bits, W);
  if (bits == 0) return T(0);
  using U = std::make_unsigned_t<T>;
  U u = U(U(x) << (W - offset - bits));
  if constexpr (std::is_signed_v<T>) {
    return T(T(u) >> (W - bits));
  } else {
    return T(u >> (W - bits));
  }
}
template <class T, int N>
  requires std::is_integral_v<T>
constexpr vec<T, N> popcount(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = popcount(a.v[i]);
  return r;
}

namespace precise {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
}  // namespace precise
// The harness evaluates fast:: functions precisely; tests compare with tolerances.
namespace fast {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
}  // namespace fast

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
#define MSLH_LOWP_LIMITS(T, MAX, LOWEST, MIN, EPS, INF, NAN_)                 \
  template <>                                                                 \
  struct numeric_limits<T> {                                                  \
    static constexpr bool is_specialized = true;                              \
    static constexpr T max() { return T(detail::from_bits_t{}, MAX); }        \
    static constexpr T lowest() { return T(detail::from_bits_t{}, LOWEST); }  \
    static constexpr T min() { return T(detail::from_bits_t{}, MIN); }        \
    static constexpr T epsilon() { return T(detail::from_bits_t{}, EPS); }    \
    static constexpr T infinity() { return T(detail::from_bits_t{}, INF); }   \
    static constexpr T quiet_NaN() { return T(detail::from_bits_t{}, NAN_); } \
  };
MSLH_LOWP_LIMITS(half, 0x7bff, 0xfbff, 0x0400, 0x1400, 0x7c00, 0x7e00)
MSLH_LOWP_LIMITS(bfloat, 0x7f7f, 0xff7f, 0x0080, 0x3c00, 0x7f80, 0x7fc0)
#undef MSLH_LOWP_LIMITS

// ---------------------------------------------------------------------------------------------
// Synchronisation.
// ---------------------------------------------------------------------------------------------
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(unsigned(a) | unsigned(b));
}

// All threads of the threadgroup must reach the same barrier call; the harness's memory is
// sequentially consistent, so the flags only document intent.
inline void threadgroup_barrier(mem_flags,
                                std::source_location loc = std::source_location::current()) {
  mslh::threadgroup_rendezvous(mslh::site_of(loc));
}
inline void simdgroup_barrier(mem_flags,
                              std::source_location loc = std::source_location::current()) {
  mslh::simd_rendezvous(mslh::Op::kSimdBarrier, mslh::site_of(loc), nullptr, 0, nullptr, false);
}

// ---------------------------------------------------------------------------------------------
// SIMD-group functions. Every live lane of the simdgroup must call the same function at the
// same place; lanes that returned from the kernel are inactive, as on the GPU.
// ---------------------------------------------------------------------------------------------
namespace detail {

template <class T>
struct Deposit {
  T value;
  int32_t arg;
};

template <class T>
const Deposit<T>& slot(const mslh::SimdGroup& g, int buf, int lane) {
  return *reinterpret_cast<const Deposit<T>*>(g.slots[buf][lane]);
}

template <class T>
int exchange(mslh::Op op, const T& x, int32_t arg, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T>, "simd functions take scalars and vectors");
  static_assert(sizeof(Deposit<T>) <= mslh::kSlotBytes, "value too large for a simd function");
  Deposit<T> d;
  std::memset(static_cast<void*>(&d), 0, sizeof d);
  d.value = x;
  d.arg = arg;
  return mslh::simd_rendezvous(op, mslh::site_of(loc), &d, sizeof d, nullptr, false);
}

template <class T, class F>
T reduce(mslh::Op op, const T& x, const std::source_location& loc, F combine, bool inclusive_prefix,
         bool exclusive_prefix, T identity) {
  int buf = exchange(op, x, 0, loc);
  const mslh::SimdGroup& g = mslh::my_simdgroup();
  uint32_t me = mslh::self().attrs.thread_index_in_simdgroup;
  uint32_t mask = g.mask[buf];
  T acc = identity;
  bool first = true;
  for (uint32_t l = 0; l < uint32_t(mslh::kSimdWidth); ++l) {
    if (!(mask >> l & 1)) continue;
    if (exclusive_prefix && l >= me) break;
    if (inclusive_prefix && l > me) break;
    acc = first ? slot<T>(g, buf, int(l)).value : combine(acc, slot<T>(g, buf, int(l)).value);
    first = false;
  }
  return acc;
}

template <class T>
T read_lane(mslh::Op op, int buf, int src, const std::source_location& loc) {
  const mslh::SimdGroup& g = mslh::my_simdgroup();
  if (src < 0 || src >= mslh::kSimdWidth || !(g.mask[buf] >> src & 1))
    mslh::fail("%s (%s:%u) reads lane %d, which is not an active lane of this simdgroup",
               mslh::op_name(op), loc.file_name(), loc.line(), src);
  return slot<T>(g, buf, src).value;
}

template <class T>
T shuffle(mslh::Op op, const T& x, int32_t arg, const std::source_location& loc) {
  int buf = exchange(op, x, arg, loc);
  int me = int(mslh::self().attrs.thread_index_in_simdgroup);
  switch (op) {
    case mslh::Op::kShuffle:
      return read_lane<T>(op, buf, arg, loc);
    case mslh::Op::kShuffleXor:
      return read_lane<T>(op, buf, me ^ arg, loc);
    // "The computed lane ID does not wrap around": edge lanes keep their own value.
    case mslh::Op::kShuffleDown:
      return me + arg >= mslh::kSimdWidth ? x : read_lane<T>(op, buf, me + arg, loc);
    case mslh::Op::kShuffleUp:
      return me - arg < 0 ? x : read_lane<T>(op, buf, me - arg, loc);
    default:
      mslh::fail("harness: bad shuffle op");
  }
}

template <class T>
T broadcast(mslh::Op op, const T& x, int32_t lane, const std::source_location& loc) {
  int buf = exchange(op, x, lane, loc);
  const mslh::SimdGroup& g = mslh::my_simdgroup();
  for (int l = 0; l < mslh::kSimdWidth; ++l)
    if ((g.mask[buf] >> l & 1) && slot<T>(g, buf, l).arg != lane)
      mslh::fail("%s (%s:%u): the lane argument must be the same in every lane (%d vs %d)",
                 mslh::op_name(op), loc.file_name(), loc.line(), lane, slot<T>(g, buf, l).arg);
  if (op == mslh::Op::kBroadcastFirst) return slot<T>(g, buf, std::countr_zero(g.mask[buf])).value;
  return read_lane<T>(op, buf, lane, loc);
}

}  // namespace detail

#define MSLH_LOC std::source_location loc = std::source_location::current()
template <class T>
T simd_sum(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kSum, x, loc, [](T a, T b) { return T(a + b); }, false, false, T(0));
}
template <class T>
T simd_product(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kProd, x, loc, [](T a, T b) { return T(a * b); }, false, false, T(1));
}
template <class T>
T simd_max(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kMax, x, loc, [](T a, T b) { return max(a, b); }, false, false, x);
}
template <class T>
T simd_min(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kMin, x, loc, [](T a, T b) { return min(a, b); }, false, false, x);
}
template <class T>
T simd_and(T x, MSLH_LOC) {
  return detail::reduce(mslh::Op::kAnd, x, loc, [](T a, T b) { return T(a & b); }, false, false, x);
}
template <class T>
T simd_or(T x, MSLH_LOC) {
  return detail::reduce(mslh::Op::kOr, x, loc, [](T a, T b) { return T(a | b); }, false, false, x);
}
template <class T>
T simd_xor(T x, MSLH_LOC) {
  return detail::reduce(mslh::Op::kXor, x, loc, [](T a, T b) { return T(a ^ b); }, false, false, x);
}
inline bool simd_all(bool x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kAll, x, loc, [](bool a, bool b) { return a && b; }, false, false, x);
}
inline bool simd_any(bool x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kAny, x, loc, [](bool a, bool b) { return a || b; }, false, false, x);
}
template <class T>
T simd_prefix_inclusive_sum(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kPrefixInclusiveSum, x, loc, [](T a, T b) { return T(a + b); }, true, false, T(0));
}
template <class T>
T simd_prefix_exclusive_sum(T x, MSLH_LOC) {
  return detail::reduce(
      mslh::Op::kPrefixExclusiveSum, x, loc, [](T a, T b) { return T(a + b); }, false, true, T(0));
}
template <class T>
T simd_shuffle(T x, unsigned short lane, MSLH_LOC) {
  return detail::shuffle(mslh::Op::kShuffle, x, lane, loc);
}
template <class T>
T simd_shuffle_xor(T x, unsigned short mask, MSLH_LOC) {
  return detail::shuffle(mslh::Op::kShuffleXor, x, mask, loc);
}
template <class T>
T simd_shuffle_down(T x, unsigned short delta, MSLH_LOC) {
  return detail::shuffle(mslh::Op::kShuffleDown, x, delta, loc);
}
template <class T>
T simd_shuffle_up(T x, unsigned short delta, MSLH_LOC) {
  return detail::shuffle(mslh::Op::kShuffleUp, x, delta, loc);
}
template <class T>
T simd_broadcast(T x, unsigned short lane, MSLH_LOC) {
  return detail::broadcast(mslh::Op::kBroadcast, x, lane, loc);
}
template <class T>
T simd_broadcast_first(T x, MSLH_LOC) {
  return detail::broadcast(mslh::Op::kBroadcastFirst, x, 0, loc);
}
inline bool simd_is_first(MSLH_LOC) {
  return simd_broadcast_first(uint16_t(mslh::self().attrs.thread_index_in_simdgroup), loc) ==
         mslh::self().attrs.thread_index_in_simdgroup;
}

// ---------------------------------------------------------------------------------------------
// simdgroup_matrix<T, 8, 8>. Each lane holds two elements, at the positions MLX's steel kernels
// rely on (thread_elements()); load, store and multiply are simdgroup-wide operations that one
// lane performs for all 32 once every lane has arrived, with uniform arguments checked.
// ---------------------------------------------------------------------------------------------
template <class T, int Cols, int Rows>
struct simdgroup_matrix;

namespace detail {

// Row and first column of the two consecutive elements lane `l` holds.
constexpr int frag_row(int l) { return ((l / 4) & 4) + ((l / 2) % 4); }
constexpr int frag_col(int l) { return ((l / 4) & 2) * 2 + (l % 2) * 2; }

template <class T>
struct MatIo {
  const void* ptr;
  uint64_t elements_per_row;
  uint64_t origin_x, origin_y;
  uint32_t transpose;
  T e[2];  // the lane's elements (store only)
};

template <class T>
const MatIo<T>& uniform_io(const mslh::SimdGroup& g, int buf) {
  const MatIo<T>& a = *reinterpret_cast<const MatIo<T>*>(g.slots[buf][0]);
  for (int l = 1; l < mslh::kSimdWidth; ++l) {
    const MatIo<T>& b = *reinterpret_cast<const MatIo<T>*>(g.slots[buf][l]);
    if (a.ptr != b.ptr || a.elements_per_row != b.elements_per_row || a.origin_x != b.origin_x ||
        a.origin_y != b.origin_y || a.transpose != b.transpose)
      mslh::fail(
          "%s (%s:%u): arguments differ between lanes 0 and %d (pointer, elements_per_row, "
          "matrix_origin and transpose must be the same in every lane)",
          mslh::op_name(g.op), g.site.file, g.site.line, l);
  }
  if (a.transpose && (a.origin_x || a.origin_y))
    mslh::fail(
        "%s (%s:%u): matrix_origin together with transpose_matrix is not supported by the "
        "harness (its meaning is not pinned down); offset the pointer instead",
        mslh::op_name(g.op), g.site.file, g.site.line);
  return a;
}

// Memory offset of matrix element (r, c).
template <class T>
uint64_t mat_offset(const MatIo<T>& io, int r, int c) {
  return io.transpose
             ? uint64_t(c) * io.elements_per_row + uint64_t(r)
             : (io.origin_y + uint64_t(r)) * io.elements_per_row + io.origin_x + uint64_t(c);
}

template <class T>
void complete_load(mslh::SimdGroup& g, int buf) {
  const MatIo<T>& io = uniform_io<T>(g, buf);
  const T* src = static_cast<const T*>(io.ptr);
  for (int l = 0; l < mslh::kSimdWidth; ++l) {
    T* out = reinterpret_cast<T*>(g.results[buf][l]);
    for (int j = 0; j < 2; ++j) out[j] = src[mat_offset(io, frag_row(l), frag_col(l) + j)];
  }
}

template <class T>
void complete_store(mslh::SimdGroup& g, int buf) {
  const MatIo<T>& io = uniform_io<T>(g, buf);
  T* dst = const_cast<T*>(static_cast<const T*>(io.ptr));
  for (int l = 0; l < mslh::kSimdWidth; ++l) {
    const MatIo<T>& mine = *reinterpret_cast<const MatIo<T>*>(g.slots[buf][l]);
    for (int j = 0; j < 2; ++j) dst[mat_offset(io, frag_row(l), frag_col(l) + j)] = mine.e[j];
  }
}

template <class T>
struct MatMul {
  T a[2], b[2], c[2];
};

// D = A * B + C, accumulated in float with fused multiply-adds over k = 0..7.
template <class T>
void complete_mma(mslh::SimdGroup& g, int buf) {
  float A[8][8], B[8][8], C[8][8];
  for (int l = 0; l < mslh::kSimdWidth; ++l) {
    const MatMul<T>& m = *reinterpret_cast<const MatMul<T>*>(g.slots[buf][l]);
    for (int j = 0; j < 2; ++j) {
      A[frag_row(l)][frag_col(l) + j] = float(m.a[j]);
      B[frag_row(l)][frag_col(l) + j] = float(m.b[j]);
      C[frag_row(l)][frag_col(l) + j] = float(m.c[j]);
    }
  }
  for (int l = 0; l < mslh::kSimdWidth; ++l) {
    T* out = reinterpret_cast<T*>(g.results[buf][l]);
    for (int j = 0; j < 2; ++j) {
      int r = frag_row(l), c = frag_col(l) + j;
      float acc = C[r][c];
      for (int k = 0; k < 8; ++k) acc = std::fma(A[r][k], B[k][c], acc);
      out[j] = T(acc);
    }
  }
}

}  // namespace detail

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "simdgroup_matrix: MSL supports 8x8 only");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>,
                "simdgroup_matrix element type must be float, half or bfloat");
  vec<T, 2> elems;

  // Uninitialised on the GPU: NaN here, so that reading it shows.
  simdgroup_matrix() : elems(numeric_limits<T>::quiet_NaN()) {}
  // A diagonal matrix with `d` on the diagonal.
  explicit simdgroup_matrix(T d) {
    int l = int(mslh::self().attrs.thread_index_in_simdgroup);
    for (int j = 0; j < 2; ++j)
      elems.v[j] = detail::frag_row(l) == detail::frag_col(l) + j ? d : T(0);
  }
  vec<T, 2>& thread_elements() { return elems; }
  const vec<T, 2>& thread_elements() const { return elems; }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.elems = vec<T, 2>(value);
  return m;
}

template <class T>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const T* src, unsigned long elements_per_row = 8,
                    vec<unsigned long, 2> matrix_origin = vec<unsigned long, 2>(0),
                    bool transpose_matrix = false, MSLH_LOC) {
  detail::MatIo<T> io{src, elements_per_row, matrix_origin.x, matrix_origin.y, transpose_matrix,
                      {}};
  int buf = mslh::simd_rendezvous(mslh::Op::kMatLoad, mslh::site_of(loc), &io, sizeof io,
                                  detail::complete_load<T>, true);
  const T* mine = reinterpret_cast<const T*>(
      mslh::my_simdgroup().results[buf][mslh::self().attrs.thread_index_in_simdgroup]);
  d.elems = vec<T, 2>(mine[0], mine[1]);
}

template <class T>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, T* dst, unsigned long elements_per_row = 8,
                     vec<unsigned long, 2> matrix_origin = vec<unsigned long, 2>(0),
                     bool transpose_matrix = false, MSLH_LOC) {
  detail::MatIo<T> io{dst,
                      elements_per_row,
                      matrix_origin.x,
                      matrix_origin.y,
                      transpose_matrix,
                      {a.elems.v[0], a.elems.v[1]}};
  mslh::simd_rendezvous(mslh::Op::kMatStore, mslh::site_of(loc), &io, sizeof io,
                        detail::complete_store<T>, true);
}

template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b,
                                   const simdgroup_matrix<T, 8, 8>& c, MSLH_LOC) {
  detail::MatMul<T> m{
      {a.elems.v[0], a.elems.v[1]}, {b.elems.v[0], b.elems.v[1]}, {c.elems.v[0], c.elems.v[1]}};
  int buf = mslh::simd_rendezvous(mslh::Op::kMatMul, mslh::site_of(loc), &m, sizeof m,
                                  detail::complete_mma<T>, true);
  const T* mine = reinterpret_cast<const T*>(
      mslh::my_simdgroup().results[buf][mslh::self().attrs.thread_index_in_simdgroup]);
  d.elems = vec<T, 2>(mine[0], mine[1]);
}

template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                        const simdgroup_matrix<T, 8, 8>& b, MSLH_LOC) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)), loc);
}
#undef MSLH_LOC

// ---------------------------------------------------------------------------------------------
// Known MSL features the harness does not model: using one fails to compile with this message.
// ---------------------------------------------------------------------------------------------
#define MSLH_UNSUPPORTED_FN(NAME)                                                             \
  template <class... A>                                                                       \
  void NAME(A&&...) {                                                                         \
    static_assert(kUnsupported<A...>,                                                         \
                  "msl harness: " #NAME " is not supported (tests/metal_harness/README.md)"); \
  }
MSLH_UNSUPPORTED_FN(quad_sum)
MSLH_UNSUPPORTED_FN(quad_max)
MSLH_UNSUPPORTED_FN(quad_min)
MSLH_UNSUPPORTED_FN(quad_shuffle)
MSLH_UNSUPPORTED_FN(quad_shuffle_down)
MSLH_UNSUPPORTED_FN(quad_shuffle_up)
MSLH_UNSUPPORTED_FN(quad_shuffle_xor)
MSLH_UNSUPPORTED_FN(quad_broadcast)
MSLH_UNSUPPORTED_FN(simd_ballot)
MSLH_UNSUPPORTED_FN(simd_shuffle_rotate_down)
MSLH_UNSUPPORTED_FN(simd_shuffle_rotate_up)
MSLH_UNSUPPORTED_FN(simd_shuffle_and_fill_down)
MSLH_UNSUPPORTED_FN(simd_shuffle_and_fill_up)
MSLH_UNSUPPORTED_FN(atomic_load_explicit)
MSLH_UNSUPPORTED_FN(atomic_store_explicit)
MSLH_UNSUPPORTED_FN(atomic_fetch_add_explicit)
MSLH_UNSUPPORTED_FN(atomic_fetch_max_explicit)
MSLH_UNSUPPORTED_FN(atomic_fetch_min_explicit)
MSLH_UNSUPPORTED_FN(atomic_exchange_explicit)
MSLH_UNSUPPORTED_FN(atomic_compare_exchange_weak_explicit)
MSLH_UNSUPPORTED_FN(mem_fence)
#undef MSLH_UNSUPPORTED_FN
#define MSLH_UNSUPPORTED_TYPE(NAME)                                                           \
  template <class... A>                                                                       \
  struct NAME {                                                                               \
    static_assert(kUnsupported<A...>,                                                         \
                  "msl harness: " #NAME " is not supported (tests/metal_harness/README.md)"); \
  };
MSLH_UNSUPPORTED_TYPE(atomic)
MSLH_UNSUPPORTED_TYPE(texture1d)
MSLH_UNSUPPORTED_TYPE(texture2d)
MSLH_UNSUPPORTED_TYPE(texture3d)
MSLH_UNSUPPORTED_TYPE(packed_vec)
#undef MSLH_UNSUPPORTED_TYPE

}  // namespace metal

// MSL's scalar type names outside the metal namespace, and MLX's Metal preamble aliases
// (mlx/backend/metal/kernels/utils.h, bf16.h) that generated signatures use.
using namespace metal;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef half float16_t;
typedef bfloat bfloat16_t;
#define METAL_FUNC inline

namespace mslh {
inline uint3 to_uint3(const V3<uint32_t>& v) { return uint3(v.x, v.y, v.z); }
}  // namespace mslh

// Address-space qualifiers: all memory is host memory here, so they carry no meaning.
// (threadgroup *declarations* are rewritten by the translator before compilation.)
#define device
#define constant
#define thread
#define threadgroup

#endif  // MSLH_SHIM_H
