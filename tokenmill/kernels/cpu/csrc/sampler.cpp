// The sampler's passes over (B, V) logits on the CPU (AVX-512, one row per work item); tokenmill/sampling/ keeps the
// PyTorch path beside each as the reference (candidates.block_max / masses / gather, penalties.penalize).
//
// tokenmill::block_max(x, G) -> (B, ceil(V / G)) float32: the maximum of each run of G columns (NaN if any is NaN)
// tokenmill::copy_block_max(src, dst, G) -> block_max(src, G), copying src into dst (same shape) on the way
// tokenmill::block_max_update(x, blocks, rows, cols, old, G): blocks (x's block maxima before an edit) made current
//   after x[rows[i], cols[i, j]] changed from old[i, j] (cols, old (n, L)); G a power of two
// tokenmill::penalties(x, blocks, hist, rep, range, decay, freq, pres, n_out, G) -> old: penalties.penalize on x in
//   place over hist (B, L) (-1: none), each token once, and blocks (optional) kept current (as block_max_update);
//   rep, range (inf: all), decay, freq, pres (B,) float32, n_out (B,) each row's output length; old (B, L): x at
//   hist.clamp(min=0) before
// tokenmill::masses(x, rows, top, t, G, entropy) -> (R, nb) block sums of p = exp((x[rows] - top) / t), and (R,) the
//   entropy of p / sum(p) (empty unless asked)
// tokenmill::block_masses(x, t, G, entropy) -> (block_max(x, G), and in the rows where t (B,) > 0 masses(x, all
//   rows, each row's maximum, t, G, entropy) in one pass (0 and NaN in the others))
// tokenmill::candidates(x, rows, blocks, tau, G, cap) -> (vals (R, C), ids (R, C) int64, counts (R,) int64): each
//   row's tokens with x >= max(tau, -FLT_MAX), looked for only in the blocks whose maximum (blocks (R, nb)) reaches
//   tau; sorted descending, ties in id order (-0.0 as 0.0), -inf / 0 padding on the right. A row with more than cap
//   candidates stops counting at cap + 1 and is left empty; C is the largest count <= cap.
// x: (B, V) float32, contiguous; rows (R,) int64 index x's rows; top, t, tau (R,) float32.
//
// Why: in torch each of these is several passes or ~10 ops (copy + unfold/amax; gather, owners map, scatter;
// sub/div/exp/sum; compare + nonzero + index + sort); here each row is read once per op while it is in the cache,
// and the few candidates are radix-sorted on 32-bit keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx512_exp.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kAhead = 8;  // blocks prefetched ahead by `candidates`

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous (B, V) float32 CPU tensor");
}

void check_rows(const at::Tensor& rows, const at::Tensor& x) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be (R,) int64");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(0 <= r[i] && r[i] < x.size(0), "row out of range: ", r[i]);
}

at::Tensor contiguous_float(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n, name, " must hold one value per row");
  return t.to(at::kFloat).contiguous().view({n});
}

float scalar_max(const float* p, int64_t n) {
  float m = -kInf;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(p[j])) return p[j];
    m = std::max(m, p[j]);
  }
  return m;
}

// the maximum of p[0..n) as torch.amax gives it (NaN if any is NaN)
inline float max_of(const float* p, int64_t n) {
  if (n % 16) return scalar_max(p, n);
  __m512 m = _mm512_loadu_ps(p);
  __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
  for (int64_t j = 16; j < n; j += 16) {
    __m512 v = _mm512_loadu_ps(p + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  return nan ? scalar_max(p, n) : _mm512_reduce_max_ps(m);
}

at::Tensor block_max(const at::Tensor& x, int64_t G) {
  check_x(x);
  TORCH_CHECK(G > 0, "G must be positive");
  const int64_t B = x.size(0), V = x.size(1), nb = (V + G - 1) / G;
  at::Tensor out = at::empty({B, nb}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = xp + b * V;
      float* o = op + b * nb;
      for (int64_t k = 0; k < nb; ++k) o[k] = max_of(row + k * G, std::min(G, V - k * G));
    }
  });
  return out;
}

at::Tensor copy_block_max(const at::Tensor& src, at::Tensor& dst, int64_t G) {
  check_x(src);
  check_x(dst);
  TORCH_CHECK(src.sizes() == dst.sizes(), "src and dst must have one shape");
  TORCH_CHECK(G > 0, "G must be positive");
  const int64_t B = src.size(0), V = src.size(1), nb = (V + G - 1) / G, full = V / G;
  at::Tensor out = at::empty({B, nb}, src.options());
  const float* sp = src.data_ptr<float>();
  float *dp = dst.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = sp + b * V;
      float* d = dp + b * V;
      float* o = op + b * nb;
      int64_t k = 0;
      if (G % 16 == 0) {  // plain stores: the copy stays in the last-level cache for the passes after
        for (; k < full; ++k) {
          const float* p = row + k * G;
          __m512 m = _mm512_loadu_ps(p);
          __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
          _mm512_storeu_ps(d + k * G, m);
          for (int64_t j = 16; j < G; j += 16) {
            __m512 v = _mm512_loadu_ps(p + j);
            _mm512_storeu_ps(d + k * G + j, v);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
          }
          o[k] = nan ? scalar_max(p, G) : _mm512_reduce_max_ps(m);
        }
      }
      std::memcpy(d + k * G, row + k * G, (V - k * G) * sizeof(float));
      for (; k < nb; ++k) o[k] = scalar_max(row + k * G, std::min(G, V - k * G));
    }
  });
  return out;
}

void block_max_update(const at::Tensor& x, at::Tensor& blocks, const at::Tensor& rows, const at::Tensor& cols,
                      const at::Tensor& old, int64_t G) {
  check_x(x);
  const int64_t B = x.size(0), V = x.size(1), nb = (V + G - 1) / G;
  TORCH_CHECK(G > 0 && (G & (G - 1)) == 0, "G must be a power of two");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == B && blocks.size(1) == nb && blocks.is_contiguous() &&
              blocks.scalar_type() == at::kFloat, "blocks must be x's (B, ceil(V / G)) block maxima");
  TORCH_CHECK(rows.dim() == 1 && cols.dim() == 2 && cols.size(0) == rows.size(0) && old.sizes() == cols.sizes(),
              "rows (n,), cols and old (n, L)");
  at::Tensor r_ = rows.to(at::kLong).contiguous(), c_ = cols.to(at::kLong).contiguous();
  at::Tensor o_ = old.to(at::kFloat).contiguous();
  const int64_t n = c_.size(0), L = c_.size(1), shift = __builtin_ctzll(G);
  const float* xp = x.data_ptr<float>();
  float* bp = blocks.data_ptr<float>();
  const int64_t *rp = r_.data_ptr<int64_t>(), *cp = c_.data_ptr<int64_t>();
  const float* op = o_.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rp[i];
    TORCH_CHECK(0 <= r && r < B, "row out of range: ", r);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t c = cp[i * L + l];
      TORCH_CHECK(0 <= c && c < V, "column out of range: ", c);
      const int64_t k = c >> shift;
      float& m = bp[r * nb + k];
      const float before = op[i * L + l], now = xp[r * V + c];
      if (before == m || std::isnan(before) || std::isnan(now) || std::isnan(m))  // the maximum may have moved
        m = max_of(xp + r * V + (k << shift), std::min(G, V - (k << shift)));
      else if (now > m)
        m = now;
    }
  }
}

// float arithmetic as the torch reference (penalties.py) does it, op by op (no fused multiply-adds)
__attribute__((optimize("fp-contract=off"))) at::Tensor penalties(at::Tensor& x, const std::optional<at::Tensor>& blocks_,
                                                                 const at::Tensor& hist,
                                                           const at::Tensor& rep_, const at::Tensor& range_,
                                                           const at::Tensor& decay_, const at::Tensor& freq_,
                                                           const at::Tensor& pres_, const at::Tensor& n_out_, int64_t G) {
  check_x(x);
  const int64_t B = x.size(0), V = x.size(1), nb = (V + G - 1) / G;
  TORCH_CHECK(G > 0 && (G & (G - 1)) == 0, "G must be a power of two");
  if (blocks_)
    TORCH_CHECK(blocks_->dim() == 2 && blocks_->size(0) == B && blocks_->size(1) == nb && blocks_->is_contiguous() &&
                blocks_->scalar_type() == at::kFloat, "blocks must be x's (B, ceil(V / G)) block maxima");
  TORCH_CHECK(hist.dim() == 2 && hist.size(0) == B, "hist must be (B, L)");
  at::Tensor h = hist.to(at::kLong).contiguous();
  at::Tensor rep = contiguous_float(rep_, B, "rep"), range = contiguous_float(range_, B, "range");
  at::Tensor decay = contiguous_float(decay_, B, "decay"), freq = contiguous_float(freq_, B, "freq");
  at::Tensor pres = contiguous_float(pres_, B, "pres");
  at::Tensor n_out = n_out_.to(at::kLong).contiguous();
  TORCH_CHECK(n_out.numel() == B, "n_out must hold one value per row");
  const int64_t L = h.size(1), shift = __builtin_ctzll(G);
  const int64_t* hp = h.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * L; ++i) TORCH_CHECK(hp[i] < V, "token id out of range: ", hp[i]);
  at::Tensor old = at::empty({B, L}, x.options());
  float *xp = x.data_ptr<float>(), *bp = blocks_ ? blocks_->data_ptr<float>() : nullptr, *oldp = old.data_ptr<float>();
  const float *repp = rep.data_ptr<float>(), *rangep = range.data_ptr<float>(), *decayp = decay.data_ptr<float>();
  const float *freqp = freq.data_ptr<float>(), *presp = pres.data_ptr<float>();
  const int64_t* np = n_out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> slot(V, -1);  // token -> its index in toks, this row (reset after)
    std::vector<int64_t> toks, dist;
    std::vector<float> count;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* row = hp + b * L;
      float* xr = xp + b * V;
      toks.clear(), dist.clear(), count.clear();
      for (int64_t l = L - 1; l >= 0; --l) {  // newest first: a token's newest occurrence sets its distance
        const int64_t t = row[l], d = L - 1 - l;
        oldp[b * L + l] = xr[t < 0 ? 0 : t];
        if (t < 0) continue;
        if (slot[t] < 0) slot[t] = int32_t(toks.size()), toks.push_back(t), dist.push_back(d), count.push_back(0.0f);
        if (d < np[b]) count[slot[t]] += 1.0f;  // output tokens only
      }
      float* br = bp ? bp + b * nb : nullptr;
      const float rep = repp[b], r = rangep[b], dec = decayp[b], fr = freqp[b], pr = presp[b];
      for (size_t i = 0; i < toks.size(); ++i) {
        const int64_t t = toks[i];
        if (i + kAhead < toks.size()) _mm_prefetch((const char*)(xr + toks[i + kAhead]), _MM_HINT_T0);
        slot[t] = -1;
        const float before = xr[t];
        float v = before;
        float w = (r + dec - float(dist[i])) / (dec + 1.0f);
        w = std::min(std::max(w, 0.0f), 1.0f);
        const float pen = 1.0f + (rep - 1.0f) * w;
        v = v > 0 ? v / pen : v * pen;
        v = v - fr * count[i] - pr * float(count[i] > 0);
        xr[t] = v;
        if (!br) continue;
        const int64_t k = t >> shift;
        float& m = br[k];
        if (before == m || std::isnan(before) || std::isnan(v) || std::isnan(m))
          m = max_of(xr + (k << shift), std::min(G, V - (k << shift)));
        else if (v > m)
          m = v;
      }
    }
  });
  return old;
}

std::tuple<at::Tensor, at::Tensor> masses(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& top_,
                                          const at::Tensor& t_, int64_t G, bool want_entropy) {
  check_x(x);
  check_rows(rows, x);
  TORCH_CHECK(G > 0, "G must be positive");
  const int64_t R = rows.numel(), V = x.size(1), nb = (V + G - 1) / G;
  at::Tensor top = contiguous_float(top_, R, "top"), t = contiguous_float(t_, R, "t");
  at::Tensor out = at::zeros({R, nb}, x.options());
  at::Tensor ent = at::empty({want_entropy ? R : 0}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const float *tp = top.data_ptr<float>(), *sp = t.data_ptr<float>();
  float *op = out.data_ptr<float>(), *ep = ent.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + rp[r] * V;
      float* o = op + r * nb;
      const float top = tp[r], s = sp[r];
      double plogp = 0.0;  // sum of p * log p = p * z
      if (!std::isfinite(top) || !(s > 0) || G % 16 || V % 16) {  // NaN / inf rows (as torch gives them), odd shapes
        for (int64_t j = 0; j < V; ++j) {
          float z = (row[j] - top) / s, p = std::exp(z);
          o[j / G] += p;
          if (p > 0 || std::isnan(p)) plogp += double(p) * z;
        }
      } else {
        const __m512 vt = _mm512_set1_ps(top), vs = _mm512_set1_ps(1.0f / s);
        __m512 acc_pz = _mm512_setzero_ps();
        for (int64_t k = 0; k * G < V; ++k) {
          __m512 acc = _mm512_setzero_ps();
          const int64_t end = std::min(V, (k + 1) * G);
          for (int64_t j = k * G; j < end; j += 16) {
            __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), vt), vs);
            // 0 below -87 (-inf included) where torch gives 0 or a denormal
            __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), exp_nonpositive(z));
            acc = _mm512_add_ps(acc, p);
            if (want_entropy)  // p = 0 where z = -inf: 0 * -inf would be NaN, so those lanes add nothing
              acc_pz = _mm512_add_ps(acc_pz, _mm512_maskz_mul_ps(
                                                 _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_GT_OQ), p, z));
          }
          o[k] = _mm512_reduce_add_ps(acc);
        }
        plogp = _mm512_reduce_add_ps(acc_pz);
      }
      if (want_entropy) {
        double S = 0.0;
        for (int64_t k = 0; k < nb; ++k) S += o[k];
        // H(p / S) = log S - sum(p log p) / S
        ep[r] = float(std::log(S) - plogp / S);
      }
    }
  });
  return {out, ent};
}

// masses() of one row, from its maximum `top`, in plain C++ (NaN and inf rows come out as torch gives them)
double scalar_masses(const float* row, int64_t V, int64_t G, float top, float s, float* o) {
  double plogp = 0.0;
  for (int64_t k = 0; k * G < V; ++k) o[k] = 0.0f;
  for (int64_t j = 0; j < V; ++j) {
    float z = (row[j] - top) / s, p = std::exp(z);
    o[j / G] += p;
    if (p > 0 || std::isnan(p)) plogp += double(p) * z;
  }
  return plogp;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_masses(const at::Tensor& x, const at::Tensor& t_, int64_t G,
                                                             bool want_entropy) {
  check_x(x);
  TORCH_CHECK(G > 0, "G must be positive");
  const int64_t B = x.size(0), V = x.size(1), nb = (V + G - 1) / G;
  at::Tensor t = contiguous_float(t_, B, "t");
  at::Tensor blocks = at::empty({B, nb}, x.options()), out = at::zeros({B, nb}, x.options());
  at::Tensor ent = at::full({B}, std::numeric_limits<float>::quiet_NaN(), x.options());
  const float *xp = x.data_ptr<float>(), *sp = t.data_ptr<float>();
  float *bp = blocks.data_ptr<float>(), *op = out.data_ptr<float>(), *ep = ent.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> pz(nb);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * V;
      float *bm = bp + r * nb, *o = op + r * nb;
      const float s = sp[r];
      if (!(s > 0) || G % 16 || V % 16) {  // block maxima only; or odd shapes: two plain passes
        for (int64_t k = 0; k < nb; ++k) bm[k] = max_of(row + k * G, std::min(G, V - k * G));
        if (!(s > 0)) continue;
      } else {  // per block: its maximum m, then sum(e^w) and sum(e^w w), w = (x - m) / s, while it is in registers
        const __m512 inv = _mm512_set1_ps(1.0f / s);
        for (int64_t k = 0; k < nb; ++k) {
          const float* p = row + k * G;
          const float m = max_of(p, G);
          bm[k] = m;
          if (!std::isfinite(m)) {  // -inf: no mass; NaN, inf: the plain pass below
            o[k] = 0.0f, pz[k] = 0.0f;
            continue;
          }
          const __m512 vm = _mm512_set1_ps(m);
          __m512 acc = _mm512_setzero_ps(), acc_pz = _mm512_setzero_ps();
          for (int64_t j = 0; j < G; j += 16) {
            __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p + j), vm), inv);
            __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, _mm512_set1_ps(-87.0f), _CMP_GE_OQ),
                                           exp_nonpositive(w));
            acc = _mm512_add_ps(acc, e);
            if (want_entropy)  // e = 0 where w = -inf: 0 * -inf would be NaN, so those lanes add nothing
              acc_pz = _mm512_add_ps(acc_pz, _mm512_maskz_mul_ps(
                                                 _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ), e, w));
          }
          o[k] = _mm512_reduce_add_ps(acc), pz[k] = want_entropy ? _mm512_reduce_add_ps(acc_pz) : 0.0f;
        }
      }
      float top = -kInf;
      for (int64_t k = 0; k < nb; ++k) top = std::isnan(bm[k]) || std::isnan(top) ? NAN : std::max(top, bm[k]);
      double plogp = 0.0;
      if (!std::isfinite(top) || G % 16 || V % 16) {
        plogp = scalar_masses(row, V, G, top, s, o);
      } else {  // to units of e^(top / s): sum(e^z z), z = w + c, is e^c (sum(e^w w) + c sum(e^w))
        for (int64_t k = 0; k < nb; ++k) {
          if (bm[k] == -kInf) continue;
          const float c = (bm[k] - top) / s, scale = c < -87.0f ? 0.0f : std::exp(c);
          plogp += double(scale) * (double(pz[k]) + double(c) * o[k]);
          o[k] *= scale;
        }
      }
      if (want_entropy) {
        double S = 0.0;
        for (int64_t k = 0; k < nb; ++k) S += o[k];
        ep[r] = float(std::log(S) - plogp / S);
      }
    }
  });
  return {blocks, out, ent};
}

// uint32 keys that sort ascending as the values descend: the float's bits made monotone (-0.0 as 0.0), inverted
inline uint32_t key_of(float v) {
  v += 0.0f;
  int32_t bits;
  std::memcpy(&bits, &v, 4);
  if (bits < 0) bits ^= 0x7FFFFFFF;
  return ~(uint32_t(bits) ^ 0x80000000u);
}

inline float value_of(uint32_t key) {
  int32_t bits = int32_t(~key ^ 0x80000000u);
  if (bits < 0) bits ^= 0x7FFFFFFF;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// LSD radix sort of (key, id) by key, stable (so ids that ascend stay in id order among ties), 8 bits a pass; a
// pass whose digit is the same in every key moves nothing and is skipped. Returns where the result lies: a or b.
std::pair<uint32_t*, int32_t*> radix_sort(uint32_t* key, int32_t* id, uint32_t* key2, int32_t* id2, int64_t n) {
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t pos[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++pos[(key[i] >> shift) & 255];
    if (pos[(key[0] >> shift) & 255] == n) continue;
    int64_t sum = 0;
    for (int d = 0; d < 256; ++d) std::swap(sum, pos[d]), sum += pos[d];
    for (int64_t i = 0; i < n; ++i) {
      int64_t j = pos[(key[i] >> shift) & 255]++;
      key2[j] = key[i], id2[j] = id[i];
    }
    std::swap(key, key2), std::swap(id, id2);
  }
  return {key, id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> candidates(const at::Tensor& x, const at::Tensor& rows,
                                                          const at::Tensor& blocks_, const at::Tensor& tau_, int64_t G,
                                                          int64_t cap) {
  check_x(x);
  check_rows(rows, x);
  TORCH_CHECK(G > 0 && cap >= 0, "G must be positive and cap non-negative");
  const int64_t R = rows.numel(), V = x.size(1), nb = (V + G - 1) / G;
  at::Tensor blocks = blocks_.to(at::kFloat).contiguous();
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == R && blocks.size(1) == nb, "blocks must be (R, ceil(V / G))");
  at::Tensor tau = contiguous_float(tau_, R, "tau");
  at::Tensor counts = at::empty({R}, rows.options());
  std::vector<std::vector<uint32_t>> keys(R);
  std::vector<std::vector<int32_t>> sorted_ids(R);
  const float *xp = x.data_ptr<float>(), *bp = blocks.data_ptr<float>(), *taup = tau.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> vals;
    std::vector<int32_t> ids, chosen, ids2;
    std::vector<uint32_t> keys1, keys2;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + rp[r] * V;
      const float* bm = bp + r * nb;
      const float t = taup[r] < -FLT_MAX ? -FLT_MAX : taup[r];  // tau = -inf takes every finite token
      const __m512 vt = _mm512_set1_ps(t);
      int64_t n = 0;
      vals.resize(std::min<int64_t>(cap + 1, V) + 16);  // + 16: room for a whole vector's store past the end
      ids.resize(vals.size());
      // the chosen blocks are few and scattered over a row the cache no longer holds: fetch a few ahead
      chosen.resize(nb + 16);
      int64_t nc = 0, k = 0;
      for (; k + 16 <= nb; k += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(bm + k), vt, _CMP_GE_OQ);
        _mm512_storeu_si512(chosen.data() + nc, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32(int(k)))));
        nc += __builtin_popcount(m);
      }
      for (; k < nb; ++k)
        if (bm[k] >= t) chosen[nc++] = int32_t(k);
      for (int64_t c = 0; c < nc && n <= cap; ++c) {
        if (c + kAhead < nc)
          for (int64_t j = 0; j < G; j += 16) _mm_prefetch((const char*)(row + chosen[c + kAhead] * G + j), _MM_HINT_T0);
        const int64_t start = chosen[c] * G, end = std::min(V, start + G);
        int64_t j = start;
        if (G % 16 == 0) {
          for (; j + 16 <= end && n <= cap; j += 16) {
            __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), vt, _CMP_GE_OQ);
            if (!m) continue;
            int c = __builtin_popcount(m);
            if (n + c > cap + 1) c = int(cap + 1 - n);  // over cap: the row is dropped, only its count matters
            _mm512_storeu_ps(vals.data() + n, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(row + j)));
            _mm512_storeu_si512(ids.data() + n,
                                _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32(int(j)))));
            n += c;
          }
        }
        for (; j < end && n <= cap; ++j)
          if (row[j] >= t) vals[n] = row[j], ids[n++] = int32_t(j);
      }
      cp[r] = n;
      if (n == 0 || n > cap) continue;
      keys1.resize(n), keys2.resize(n), ids2.resize(n);
      for (int64_t i = 0; i < n; ++i) keys1[i] = key_of(vals[i]);
      auto [ks, is] = radix_sort(keys1.data(), ids.data(), keys2.data(), ids2.data(), n);
      keys[r].assign(ks, ks + n), sorted_ids[r].assign(is, is + n);
    }
  });
  int64_t C = 0;
  for (int64_t r = 0; r < R; ++r)
    if (cp[r] <= cap) C = std::max(C, cp[r]);
  at::Tensor out_vals = at::full({R, C}, -kInf, x.options());
  at::Tensor out_ids = at::zeros({R, C}, rows.options());
  float* vp = out_vals.data_ptr<float>();
  int64_t* ip = out_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const std::vector<uint32_t>& k = keys[r];
    for (size_t i = 0; i < k.size(); ++i) vp[r * C + i] = value_of(k[i]), ip[r * C + i] = sorted_ids[r][i];
  }
  return {out_vals, out_ids, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("block_max(Tensor x, int G) -> Tensor");
  m.def("copy_block_max(Tensor src, Tensor(a!) dst, int G) -> Tensor");
  m.def("block_max_update(Tensor x, Tensor(a!) blocks, Tensor rows, Tensor cols, Tensor old, int G) -> ()");
  m.def("penalties(Tensor(a!) x, Tensor(b!)? blocks, Tensor hist, Tensor rep, Tensor range, Tensor decay, "
        "Tensor freq, Tensor pres, Tensor n_out, int G) -> Tensor");
  m.def("block_masses(Tensor x, Tensor t, int G, bool entropy) -> (Tensor, Tensor, Tensor)");
  m.def("masses(Tensor x, Tensor rows, Tensor top, Tensor t, int G, bool entropy) -> (Tensor, Tensor)");
  m.def("candidates(Tensor x, Tensor rows, Tensor blocks, Tensor tau, int G, int cap) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("block_max", block_max);
  m.impl("copy_block_max", copy_block_max);
  m.impl("block_max_update", block_max_update);
  m.impl("masses", masses);
  m.impl("block_masses", block_masses);
  m.impl("penalties", penalties);
  m.impl("candidates", candidates);
}
