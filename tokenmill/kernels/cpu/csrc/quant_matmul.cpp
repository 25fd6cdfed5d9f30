// y (..., N) = x (..., K) · Wᵀ for GGUF Q4_0 / Q4_1 / Q8_0 weights, repacked once in strips of 16 rows (quant_linear.py:
// `pack_strips`). Per strip s and block b of 32 columns: d[16] fp16, (Q4_1) m[16] fp16, then the quants as 16 lanes of
// 4 bytes, one lane per row, so one 64-byte load feeds 16 rows at once (no horizontal sums):
//   Q4: 4 loads g; lane n byte i = q[n, 4g+i] | q[n, 16+4g+i] << 4      Q8_0: 8 loads g; lane n byte i = q[n, 4g+i]
// Two products:
//   quant_matmul       fp32 x, each weight dequantized in registers (w = d*q + m, Q8_0: d*q) and FMA'd: the dense
//                      fp32 product up to summation order and one rounding of w (fma), so the default path.
//   quant_matmul_int8  x rows quantized to int8 per block of 32 (scale s = max|x|/127), u8 x s8 VNNI dot products:
//                      sum_k (d q + m) s a = d s sum(q a) + m s sum(a) (Q4_0: m = -8d and q - 8 -> q; Q8_0 likewise
//                      with m = -128d and q + 128 -> q, so the weights are u8). Inexact (x in 8 bits).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;  // GGML type ids

constexpr int block_bytes(int f) { return f == Q4_1 ? 320 : f == Q4_0 ? 288 : 544; }

__m512 load_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Decode reads every weight once from memory, and one core's demand misses alone reach about half the bandwidth of
// a prefetched stream (measured: 4-6 vs 8-11 GB/s), so each block asks for the bytes 4 KiB ahead of it.
constexpr int PREFETCH = 4096;
template <int F>
inline void prefetch_ahead(const uint8_t* w) {
  for (int i = 0; i < block_bytes(F); i += 64) _mm_prefetch((const char*)w + PREFETCH + i, _MM_HINT_T0);
}

// One strip (16 rows of W) against a tile of MT rows of x, stored transposed (K, MT) -> y[r, mask]. Each block's 512
// weights are dequantized once and used by all MT rows.
template <int F, int MT>
void strip_f32(const uint8_t* w, int nb, const float* x, float* y, int64_t ldy, __mmask16 mask) {
  // A accumulators per row: one FMA chain would wait out the FMA latency (4 cycles) at each step when MT < 4
  constexpr int A = MT >= 4 ? 1 : 4 / MT;
  __m512 acc[MT * A];
  for (int r = 0; r < MT * A; r++) acc[r] = _mm512_setzero_ps();
  const __m512 nibble_to_f32 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int b = 0; b < nb; b++, w += block_bytes(F)) {
    prefetch_ahead<F>(w);
    const __m512 d = load_f16(w);
    const float* xb = x + 32 * MT * b;  // x tile (K, MT): one k's MT values side by side
    if constexpr (F == Q8_0) {
#pragma GCC unroll 8
      for (int g = 0; g < 8; g++) {
        const __m512i v = _mm512_loadu_si512(w + 32 + 64 * g);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {  // byte i of each lane, sign-extended
          __m512i q = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24);
          __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
          for (int r = 0; r < MT; r++)
            acc[r * A + i % A] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[(4 * g + i) * MT + r]), acc[r * A + i % A]);
        }
      }
    } else {
      // Q4_0: w = d (q - 8) = fma(q, d, -8d), the same single rounding
      const __m512 m = F == Q4_1 ? load_f16(w + 32) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
      const uint8_t* qs = w + (F == Q4_1 ? 64 : 32);
#pragma GCC unroll 4
      for (int g = 0; g < 4; g++) {
        const __m512i v = _mm512_loadu_si512(qs + 64 * g);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
#pragma GCC unroll 4
          for (int i = 0; i < 4; i++) {
            // permutexvar reads the low 4 bits of each lane: the nibble, as fp32, without a mask or a convert
            __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * i + 4 * h), nibble_to_f32);
            __m512 wv = _mm512_fmadd_ps(q, d, m);
            const int k = 16 * h + 4 * g + i;
            for (int r = 0; r < MT; r++)
              acc[r * A + i % A] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[k * MT + r]), acc[r * A + i % A]);
          }
      }
    }
  }
  for (int r = 0; r < MT; r++) {
    for (int j = 1; j < A; j++) acc[r * A] = _mm512_add_ps(acc[r * A], acc[r * A + j]);
    _mm512_mask_storeu_ps(y + r * ldy, mask, acc[r * A]);
  }
}

// As strip_f32 for Q4 weights and int8 x: a (MT rows, K) s8, xs (rows, K/32) scales, xsum (rows, K/32) = s * sum(a).
template <int F, int MT>
void strip_i8(const uint8_t* w, int nb, const int8_t* a, const float* xs, const float* xsum, int64_t lda, int64_t lds,
              float* y, int64_t ldy, __mmask16 mask) {
  __m512 acc[MT];
  for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int b = 0; b < nb; b++, w += block_bytes(F)) {
    prefetch_ahead<F>(w);
    const __m512 d = load_f16(w);
    const __m512 m = F == Q4_1 ? load_f16(w + 32) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
    const uint8_t* qs = w + (F == Q4_1 ? 64 : 32);
    __m512i dot[MT], dot_hi[MT];  // two chains (VNNI latency 5)
    for (int r = 0; r < MT; r++) dot[r] = dot_hi[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
      const __m512i v = _mm512_loadu_si512(qs + 64 * g);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int r = 0; r < MT; r++) {
        const int8_t* ab = a + r * lda + 32 * b + 4 * g;
        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(load_i32(ab)));
        dot_hi[r] = _mm512_dpbusd_epi32(dot_hi[r], hi, _mm512_set1_epi32(load_i32(ab + 16)));
      }
    }
    for (int r = 0; r < MT; r++) {
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xs[r * lds + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot[r], dot_hi[r])), ds, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * lds + b]), acc[r]);
    }
  }
  for (int r = 0; r < MT; r++) _mm512_mask_storeu_ps(y + r * ldy, mask, acc[r]);
}

// Q8_0 weights (s8) and int8 x: VNNI multiplies u8 by s8, so the weights go in as u = q + 128 (q ^ 0x80) and the
// sum loses 128 d s sum(a) again: the Q4_1 form with m = -128 d (x stays the broadcast s8 operand, as for Q4).
template <int MT>
void strip_i8_q8(const uint8_t* w, int nb, const int8_t* a, const float* xs, const float* xsum, int64_t lda,
                 int64_t lds, float* y, int64_t ldy, __mmask16 mask) {
  __m512 acc[MT];
  for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int b = 0; b < nb; b++, w += block_bytes(Q8_0)) {
    prefetch_ahead<Q8_0>(w);
    const __m512 d = load_f16(w), m = _mm512_mul_ps(d, _mm512_set1_ps(-128.f));
    __m512i dot[MT], dot_odd[MT];  // two chains (VNNI latency 5)
    for (int r = 0; r < MT; r++) dot[r] = dot_odd[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++) {
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w + 32 + 64 * g), flip);
      for (int r = 0; r < MT; r++) {
        const __m512i ab = _mm512_set1_epi32(load_i32(a + r * lda + 32 * b + 4 * g));
        if (g % 2) dot_odd[r] = _mm512_dpbusd_epi32(dot_odd[r], u, ab);
        else dot[r] = _mm512_dpbusd_epi32(dot[r], u, ab);
      }
    }
    for (int r = 0; r < MT; r++) {
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xs[r * lds + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot[r], dot_odd[r])), ds, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * lds + b]), acc[r]);
    }
  }
  for (int r = 0; r < MT; r++) _mm512_mask_storeu_ps(y + r * ldy, mask, acc[r]);
}

// Row tiles: as many full tiles of `big` as fit, then 8, 4, 2, 1 (each tile re-dequantizes the strip, so fewer is
// better; the strip stays in L1 between tiles).
template <typename Fn>
void row_tiles(int64_t M, int big, Fn fn) {
  int64_t r = 0;
  for (; r + big <= M; r += big) fn(r, big);
  for (int t : {8, 4, 2, 1})
    for (; t < big && r + t <= M; r += t) fn(r, t);
}

// CALL with the row tile MT as the compile-time constant T (the tiles row_tiles makes; 16 only where big is 16)
#define DISPATCH_MT(MT, CALL)                         \
  switch (MT) {                                       \
    case 8: { constexpr int T = 8; CALL; break; }     \
    case 4: { constexpr int T = 4; CALL; break; }     \
    case 2: { constexpr int T = 2; CALL; break; }     \
    default: { constexpr int T = 1; CALL; break; }    \
  }
#define DISPATCH_MT16(MT, CALL)                                           \
  if (MT == 16) { constexpr int T = 16; CALL; } else DISPATCH_MT(MT, CALL)

void check(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t n) {
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0, "quant_matmul: GGML type ", qtype,
              " not supported (Q4_0, Q4_1, Q8_0)");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "quant_matmul: x must be a "
              "contiguous fp32 (..., K) tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(2) == block_bytes(qtype) && packed.size(1) * 32 == x.size(-1) &&
              packed.size(0) * 16 >= n && packed.size(0) * 16 < n + 16,
              "quant_matmul: packed weight ", packed.sizes(), " does not fit x ", x.sizes(), " and N=", n);
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  return sizes;
}

template <typename Strip>
void over_strips(int64_t n_strips, int64_t M, int64_t n, float* y, Strip strip) {
  // parallel over strips of 16 output columns: every thread reads its own part of W once
  at::parallel_for(0, n_strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; s++) {
      const int64_t cols = std::min<int64_t>(16, n - 16 * s);
      strip(s, (__mmask16)((1u << cols) - 1), y + 16 * s);
    }
  });
}

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t n) {
  check(x, packed, qtype, n);
  const int64_t K = x.size(-1), M = x.numel() / K, nb = K / 32, bb = packed.size(2) * nb;
  at::Tensor y = at::empty(out_sizes(x, n), x.options());
  // x transposed per row tile, (K, mt) each, so the mt values a weight column meets share one cache line
  at::Tensor xt = M == 1 ? x : at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* xtp = xt.data_ptr<float>();
  if (M > 1)
    row_tiles(M, 16, [&](int64_t r, int mt) {
      for (int64_t k = 0; k < K; k++)
        for (int i = 0; i < mt; i++) xtp[r * K + k * mt + i] = xp[(r + i) * K + k];
    });
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  over_strips(packed.size(0), M, n, y.data_ptr<float>(), [&](int64_t s, __mmask16 mask, float* ys) {
    row_tiles(M, 16, [&](int64_t r, int mt) {
      const uint8_t* w = wp + s * bb;
      const float* xr = xtp + r * K;
      float* yr = ys + r * n;
      if (qtype == Q4_1) { DISPATCH_MT16(mt, (strip_f32<Q4_1, T>(w, nb, xr, yr, n, mask))) }
      else if (qtype == Q4_0) { DISPATCH_MT16(mt, (strip_f32<Q4_0, T>(w, nb, xr, yr, n, mask))) }
      else { DISPATCH_MT16(mt, (strip_f32<Q8_0, T>(w, nb, xr, yr, n, mask))) }
    });
  });
  return y;
}

at::Tensor quant_matmul_int8(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t n) {
  check(x, packed, qtype, n);
  const int64_t K = x.size(-1), M = x.numel() / K, nb = K / 32, bb = packed.size(2) * nb;
  // x -> int8 per block of 32: a = round(x * 127 / max|x|), scale s = max|x| / 127; xsum = s * sum(a), the min term
  at::Tensor a = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M, nb}, x.options()), xsum = at::empty({M, nb}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float *sp = xs.data_ptr<float>(), *sump = xsum.data_ptr<float>();
  at::parallel_for(0, M * nb, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const __m512 lo = _mm512_loadu_ps(xp + 32 * i), hi = _mm512_loadu_ps(xp + 32 * i + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float s = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vinv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vinv));
      _mm_storeu_si128((__m128i*)(ap + 32 * i), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128((__m128i*)(ap + 32 * i + 16), _mm512_cvtsepi32_epi8(qhi));
      sp[i] = s;
      sump[i] = s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
  });
  at::Tensor y = at::empty(out_sizes(x, n), x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  over_strips(packed.size(0), M, n, y.data_ptr<float>(), [&](int64_t s, __mmask16 mask, float* ys) {
    row_tiles(M, 8, [&](int64_t r, int mt) {
      const uint8_t* w = wp + s * bb;
      const int8_t* ar = ap + r * K;
      const float *sr = sp + r * nb, *sumr = sump + r * nb;
      float* yr = ys + r * n;
      if (qtype == Q4_1) { DISPATCH_MT(mt, (strip_i8<Q4_1, T>(w, nb, ar, sr, sumr, K, nb, yr, n, mask))) }
      else if (qtype == Q4_0) { DISPATCH_MT(mt, (strip_i8<Q4_0, T>(w, nb, ar, sr, sumr, K, nb, yr, n, mask))) }
      else { DISPATCH_MT(mt, (strip_i8_q8<T>(w, nb, ar, sr, sumr, K, nb, yr, n, mask))) }
    });
  });
  return y;
}

}  // namespace

// schemas and CPU kernels apart, so torch.compile can take the fake impls registered in quant_linear.py
TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("quant_matmul(Tensor x, Tensor packed, int qtype, int n) -> Tensor");
  m.def("quant_matmul_int8(Tensor x, Tensor packed, int qtype, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("quant_matmul", quant_matmul);
  m.impl("quant_matmul_int8", quant_matmul_int8);
}
