// Decode attention on the CPU, reading the KV cache in place through block tables (AVX-512, fp32 arithmetic).
//
// tokenmill::decode_attention(q, k, v, tables, lengths, window, scale) -> out
//   q        (B, H, D) float32, one query per sequence (D contiguous; other strides free)
//   k, v     (N, bs, KV, D) float32 / float16 / bfloat16 block pools, D contiguous, other strides free: the paged
//            cache is (blocks, bs, KV, D); the contiguous cache (rows, KV, capacity, D) passes its permuted view, one
//            "block" per row
//   tables   (B, W) int64: sequence b's key j lives in block tables[b, j / bs], slot j % bs
//   lengths  (B,) int64: sequence b attends keys [max(0, len - window), len); its query is at position len - 1
//   window   <= 0: no sliding window
//   out      (B, H, D) float32 = softmax(q k^T * scale) v per head; query head h reads kv head h / (H / KV)
//
// Why a kernel: a decode query is a few rows against thousands of keys, so attention is a read of K and V; torch's
// SDPA reaches ~10 GB/s on it and the paged path first copies the blocks out (index_select). Here each work item
// reads one kv head's keys once for all its query heads (GQA), over one key range, with an online softmax; key
// ranges of one head are split so both cores stream (batch 1) and partial results are merged after.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx512_exp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kTile = 16;      // keys scored together (one 16-lane vector of scores)
constexpr int kMaxGroup = 4;   // query heads per work item; a larger GQA group is split into several items
constexpr int64_t kMinSplit = 64;
constexpr int64_t kPrefetch = 32;  // keys ahead whose K/V rows are prefetched (measured: 15-20% at 2,048 keys)

// 16 lanes of K/V as fp32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// 16 vectors -> one vector whose lane i is the sum of s[i]'s lanes (a transpose-and-add tree: 45 ops for 16 sums)
inline __m512 sum_lanes16(__m512 s[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of the pair (x, y)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's partial sums of 4 consecutive vectors
    __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // fold 128-bit lanes pairwise
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

struct Pool {  // one of k / v: base pointer and element strides of (N, bs, KV, D)
  const void* base;
  int64_t block, slot, head;
};

// One work item: G query heads (rows of q, D = 16 * NV floats) over keys [lo, hi) of one kv head of one sequence.
// Writes the running max m[g], the softmax denominator l[g] and the unnormalized output acc[g][D].
template <int NV, int G, typename T>
void attend_range(const float* const* qrows, const Pool& kp, const Pool& vp, int kvh, const int64_t* table, int64_t bs,
                  int64_t lo, int64_t hi, float scale, float* m_out, float* l_out, float* acc_out) {
  __m512 q[G][NV], acc[G][NV], l[G];  // q pre-scaled; l: the softmax denominator, summed lane-wise
  float m[G];
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < NV; ++c) {
      q[g][c] = _mm512_mul_ps(_mm512_loadu_ps(qrows[g] + 16 * c), _mm512_set1_ps(scale));
      acc[g][c] = _mm512_setzero_ps();
    }
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = _mm512_setzero_ps();
  }
  const T* kb = static_cast<const T*>(kp.base) + kvh * kp.head;
  const T* vb = static_cast<const T*>(vp.base) + kvh * vp.head;
  const T* krow[kTile];
  const T* vrow[kTile];
  int64_t blk = lo / bs, slot = lo % bs;
  const int64_t pf0 = std::min(hi, lo + kPrefetch);
  int64_t pblk = pf0 / bs, pslot = pf0 % bs, pj = pf0;
  constexpr int kLines = (16 * NV * static_cast<int>(sizeof(T)) + 63) / 64;
  alignas(64) float p[G][kTile];
  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, hi - j0));
    for (int i = 0; i < n; ++i) {
      krow[i] = kb + table[blk] * kp.block + slot * kp.slot;
      vrow[i] = vb + table[blk] * vp.block + slot * vp.slot;
      if (++slot == bs) slot = 0, ++blk;
    }
    for (int i = 0; i < kTile && pj < hi; ++i, ++pj) {  // the rows kPrefetch keys ahead, into L1
      const char* kr = reinterpret_cast<const char*>(kb + table[pblk] * kp.block + pslot * kp.slot);
      const char* vr = reinterpret_cast<const char*>(vb + table[pblk] * vp.block + pslot * vp.slot);
      for (int c = 0; c < kLines; ++c) {
        _mm_prefetch(kr + 64 * c, _MM_HINT_T0);
        _mm_prefetch(vr + 64 * c, _MM_HINT_T0);
      }
      if (++pslot == bs) pslot = 0, ++pblk;
    }
    // scores: each key row is loaded (and widened) once for all G query heads; s[g][i] holds 16 partial sums
    alignas(64) __m512 s[G][kTile];
    for (int i = 0; i < n; ++i) {
      __m512 kr[NV];
      for (int c = 0; c < NV; ++c) kr[c] = load16(krow[i] + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 d = _mm512_mul_ps(q[g][0], kr[0]);
        for (int c = 1; c < NV; ++c) d = _mm512_fmadd_ps(q[g][c], kr[c], d);
        s[g][i] = d;
      }
    }
    for (int i = n; i < kTile; ++i)
      for (int g = 0; g < G; ++g) s[g][i] = _mm512_setzero_ps();
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int g = 0; g < G; ++g) {
      const __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                             sum_lanes16(s[g]));
      const float m_new = std::max(m[g], _mm512_reduce_max_ps(sc));
      if (m_new > m[g]) {  // a new running max: rescale what was summed so far (0 on the first tile, m = -inf)
        const __m512 f = _mm512_set1_ps(std::exp(m[g] - m_new));
        for (int c = 0; c < NV; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], f);
        l[g] = _mm512_mul_ps(l[g], f);
        m[g] = m_new;
      }
      const __m512 e = exp_nonpositive(_mm512_sub_ps(sc, _mm512_set1_ps(m_new)));
      l[g] = _mm512_add_ps(l[g], e);
      _mm512_store_ps(p[g], e);
    }
    for (int i = 0; i < n; ++i) {
      for (int c = 0; c < NV; ++c) {
        const __m512 x = load16(vrow[i] + 16 * c);
        for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g][i]), x, acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    m_out[g] = m[g];
    l_out[g] = _mm512_reduce_add_ps(l[g]);
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc_out + g * NV * 16 + 16 * c, acc[g][c]);
  }
}

using RangeFn = void (*)(const float* const*, const Pool&, const Pool&, int, const int64_t*, int64_t, int64_t, int64_t,
                         float, float*, float*, float*);

template <int NV, typename T>
RangeFn pick_group(int g) {
  switch (g) {
    case 1: return attend_range<NV, 1, T>;
    case 2: return attend_range<NV, 2, T>;
    case 3: return attend_range<NV, 3, T>;
    case 4: return attend_range<NV, 4, T>;
  }
  return nullptr;
}

template <typename T>
RangeFn pick(int64_t d, int g) {
  switch (d) {
    case 16: return pick_group<1, T>(g);
    case 32: return pick_group<2, T>(g);
    case 64: return pick_group<4, T>(g);
    case 80: return pick_group<5, T>(g);
    case 96: return pick_group<6, T>(g);
    case 128: return pick_group<8, T>(g);
    case 256: return pick_group<16, T>(g);
  }
  return nullptr;
}

struct Item {  // a work item: sequence, kv head, first query head and count, key range, slot for partial results
  int64_t b, kvh, h0, g, lo, hi, part;
};

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                            const at::Tensor& lengths, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1, "q must be (B, H, D) float32 with D contiguous");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "k and v must be (N, bs, KV, D) pools of one shape and dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need D contiguous");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.is_contiguous(), "tables must be (B, W) int64");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.is_contiguous(), "lengths must be (B,) int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t N = k.size(0), bs = k.size(1), KV = k.size(2);
  TORCH_CHECK(k.size(3) == D, "k/v head dim ", k.size(3), " != q head dim ", D);
  TORCH_CHECK(KV > 0 && H % KV == 0, "query heads ", H, " not a multiple of kv heads ", KV);
  TORCH_CHECK(tables.size(0) == B && lengths.size(0) == B, "tables and lengths need one row per query");
  const int64_t G = H / KV, W = tables.size(1);
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();

  // work items: for each (sequence, kv head, group of <= 4 query heads) its key range, split so that both cores (or
  // all threads) have several items even at batch 1; splits of at least kMinSplit keys, multiples of the tile
  const int64_t ngroups = (G + kMaxGroup - 1) / kMaxGroup;
  int64_t total = 0;
  std::vector<int64_t> lows(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && (len[b] + bs - 1) / bs <= W, "sequence ", b, " has ", len[b],
                " keys: needs 1 to ", W * bs, " for its block table");
    lows[b] = window > 0 ? std::max<int64_t>(0, len[b] - window) : 0;
    for (int64_t j = lows[b] / bs; j < (len[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(tab[b * W + j] >= 0 && tab[b * W + j] < N, "block id ", tab[b * W + j], " out of range [0, ", N, ")");
    total += len[b] - lows[b];
  }
  const int64_t threads = at::get_num_threads();
  int64_t chunk = (total * KV * ngroups + 8 * threads - 1) / (8 * threads);
  chunk = std::max<int64_t>(kMinSplit, (chunk + kTile - 1) / kTile * kTile);
  std::vector<Item> items;
  std::vector<int64_t> first_item;  // per (b, kvh, group): index of its first item; the last entry closes the list
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < KV; ++kvh)
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const int64_t h0 = kvh * G + gi * G / ngroups, g = kvh * G + (gi + 1) * G / ngroups - h0;
        const int64_t lo = lows[b], hi = len[b];
        const int64_t splits = std::max<int64_t>(1, (hi - lo + chunk / 2) / chunk);
        first_item.push_back(static_cast<int64_t>(items.size()));
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t a = lo + (hi - lo) * s / splits / kTile * kTile;
          const int64_t e = s + 1 == splits ? hi : lo + (hi - lo) * (s + 1) / splits / kTile * kTile;
          items.push_back({b, kvh, h0, g, std::max(a, lo), e, parts});
          parts += g;
        }
      }
  first_item.push_back(static_cast<int64_t>(items.size()));

  RangeFn fns[kMaxGroup + 1] = {};
  for (int g = 1; g <= kMaxGroup; ++g) {
    switch (k.scalar_type()) {
      case at::kFloat: fns[g] = pick<float>(D, g); break;
      case at::kHalf: fns[g] = pick<c10::Half>(D, g); break;
      case at::kBFloat16: fns[g] = pick<c10::BFloat16>(D, g); break;
      default: TORCH_CHECK(false, "k/v dtype ", k.scalar_type(), " not supported (float32, float16, bfloat16)");
    }
  }
  TORCH_CHECK(fns[1] != nullptr, "head dim ", D, " not supported (16, 32, 64, 80, 96, 128, 256)");

  auto out = at::empty({B, H, D}, q.options());
  // per item, g * (D + 2) floats: the g query heads' unnormalized outputs (g * D), then (m, l) per head
  std::vector<float> part(static_cast<size_t>(parts) * (D + 2));
  const Pool kp{k.data_ptr(), k.stride(0), k.stride(1), k.stride(2)};
  const Pool vp{v.data_ptr(), v.stride(0), v.stride(1), v.stride(2)};
  const float* qd = q.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1);
  const float sc = static_cast<float>(scale);
  const int64_t stride_p = D + 2;

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const float* qrows[kMaxGroup];
      float m[kMaxGroup], l[kMaxGroup];
      for (int g = 0; g < it.g; ++g) qrows[g] = qd + it.b * qsb + (it.h0 + g) * qsh;
      float* acc = part.data() + it.part * stride_p;
      fns[it.g](qrows, kp, vp, static_cast<int>(it.kvh), tab + it.b * W, bs, it.lo, it.hi, sc, m, l, acc);
      float* tail = acc + it.g * D;
      for (int g = 0; g < it.g; ++g) tail[2 * g] = m[g], tail[2 * g + 1] = l[g];
    }
  });

  // merge each (sequence, kv head, group)'s splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
  const int64_t heads = static_cast<int64_t>(first_item.size()) - 1;
  at::parallel_for(0, heads, 16, [&](int64_t x0, int64_t x1) {
    for (int64_t x = x0; x < x1; ++x) {
      const Item& first = items[first_item[x]];
      for (int64_t g = 0; g < first.g; ++g) {
        float M = -std::numeric_limits<float>::infinity(), L = 0.f;
        for (int64_t i = first_item[x]; i < first_item[x + 1]; ++i) {
          const float* tail = part.data() + items[i].part * stride_p + first.g * D;
          M = std::max(M, tail[2 * g]);
        }
        float* o = out.data_ptr<float>() + first.b * H * D + (first.h0 + g) * D;
        std::fill(o, o + D, 0.f);
        for (int64_t i = first_item[x]; i < first_item[x + 1]; ++i) {
          const float* base = part.data() + items[i].part * stride_p;
          const float* tail = base + first.g * D;
          const float w = std::exp(tail[2 * g] - M);
          L += w * tail[2 * g + 1];
          for (int64_t d = 0; d < D; ++d) o[d] += w * base[g * D + d];
        }
        const float inv = 1.f / L;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor lengths, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("decode_attention", decode_attention); }
