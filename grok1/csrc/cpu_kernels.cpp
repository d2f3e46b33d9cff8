// grok1's CPU kernels for the fast decode path (one new token per sequence).
//
// Weight-only matrix-vector products that read each weight byte once:
// - int8 (grok1/quant.py Int8Weight: q [blocks, out, in/blocks], s [blocks, out] bfloat16). The
//   release's row-parallel matrices carry one scale per (row block, output column), which no
//   single-scale library kernel can apply; here each block's partial sum is scaled and the blocks are
//   added in float32, in one pass. One row: float32 activations and FMAs; several rows of bfloat16
//   activations (batched decoding): the weights converted to bfloat16 once and vdpbf16ps per row.
// - int4 (Int4Weight: packed [out, in/32, 16] uint8, two values per byte as q+8, s [out, in/32]
//   bfloat16). Where the CPU has AVX-512 VNNI the activations are quantised to int8 per group of 32
//   (absmax / 127, as llama.cpp's Q4_0 x Q8_0 product does) and each group's dot product is exact
//   integer arithmetic; elsewhere grok1 uses PyTorch's int4 kernel instead (kernels.py decides).
// Stacks of experts ([E, ...]) are addressed by expert index, without copying.
//
// The rest fuses the small steps between the matrix products (RMS norms with their residual add,
// RoPE + KV-cache write + attention for one query, the router's softmax and top-k, the gated sum of
// the experts' outputs), each of which would otherwise be several separate tensor operations. They
// follow the fast path's arithmetic in grok1/model.py: float32 inside, rounding to bfloat16 where the
// model rounds. Work is split over output columns with ATen's thread pool, so it shares torch's
// threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GROK1_AVX512 1
// Weights are read once per token, so they are prefetched this many bytes ahead with the
// non-temporal hint: into the core's cache without displacing what the step reuses (activations, the
// KV cache) from the shared one. bench/kernel_ab.py on the mid preset: against ordinary prefetches
// the decode step took 0.93-0.98 of the time with int4 and 0.94-1.01 with int8 over several runs (the
// machine's drift is of the same size); 2048 bytes ahead beat 1024 and 4096.
#ifndef GROK1_PREFETCH
#define GROK1_PREFETCH 2048
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#endif

namespace {

// sum_k x[k] * q[k], float32 accumulation.
inline float dot_f32_i8(const float* __restrict x, const int8_t* __restrict q, int64_t n) {
  int64_t k = 0;
  float total = 0.0f;
#if defined(GROK1_AVX512)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  for (; k + 64 <= n; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(q + k + GROK1_PREFETCH), _MM_HINT_NTA);
    // Four 16-byte loads that the sign extension reads directly (no shuffles out of a 64-byte load).
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16));
    const __m128i b2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 32));
    const __m128i b3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 48));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b2)), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b3)), acc3);
  }
  for (; k + 16 <= n; k += 16) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), acc0);
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
#elif defined(GROK1_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), acc3);
  }
  __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 folded = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  folded = _mm_hadd_ps(folded, folded);
  folded = _mm_hadd_ps(folded, folded);
  total = _mm_cvtss_f32(folded);
#endif
  for (; k < n; ++k) total += x[k] * static_cast<float>(q[k]);
  return total;
}

// sum_k x[k] * w[k] for bfloat16 w, float32 accumulation.
inline float dot_f32_bf16(const float* __restrict x, const at::BFloat16* __restrict w, int64_t n) {
  int64_t k = 0;
  float total = 0.0f;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(w);
#if defined(GROK1_AVX512)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(bits + k + GROK1_PREFETCH), _MM_HINT_NTA);
    __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))), 16);
    __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k + 16))), 16);
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_castsi512_ps(lo), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_castsi512_ps(hi), acc1);
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; k < n; ++k) total += x[k] * static_cast<float>(w[k]);
  return total;
}

// out[k] = float(v[k]) for bfloat16 v (exact: a bfloat16 is the top half of a float32).
inline void bf16_to_float_row(const at::BFloat16* __restrict v, float* __restrict out, int64_t n) {
  int64_t k = 0;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
#if defined(GROK1_AVX512)
  for (; k + 16 <= n; k += 16) {
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))), 16);
    _mm512_storeu_ps(out + k, _mm512_castsi512_ps(w));
  }
#endif
  for (; k < n; ++k) out[k] = static_cast<float>(v[k]);
}

// acc[k] += a * v[k] for bfloat16 v.
inline void axpy_bf16(float* __restrict acc, float a, const at::BFloat16* __restrict v, int64_t n) {
  int64_t k = 0;
#if defined(GROK1_AVX512)
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
  const __m512 scale = _mm512_set1_ps(a);
  for (; k + 16 <= n; k += 16) {
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))), 16);
    _mm512_storeu_ps(acc + k, _mm512_add_ps(_mm512_loadu_ps(acc + k), _mm512_mul_ps(scale, _mm512_castsi512_ps(w))));
  }
#endif
  for (; k < n; ++k) acc[k] += a * static_cast<float>(v[k]);
}

// out[r] = sum_k x[r * ldx + k] * w[k] for R input rows against one bfloat16 weight row (each weight
// converted once for all of them).
template <int R>
inline void dot_rows_f32_bf16(const float* __restrict x, int64_t ldx, const at::BFloat16* __restrict w, int64_t n,
                              float* out) {
  int64_t k = 0;
  float total[R] = {};
#if defined(GROK1_AVX512)
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(w);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(bits + k + GROK1_PREFETCH), _MM_HINT_NTA);
    const __m512 wv = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + k))), 16));
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) total[r] = _mm512_reduce_add_ps(acc[r]);
#endif
  for (; k < n; ++k)
    for (int r = 0; r < R; ++r) total[r] += x[r * ldx + k] * static_cast<float>(w[k]);
  for (int r = 0; r < R; ++r) out[r] = total[r];
}

inline float bf16_to_float(const at::BFloat16 value) { return static_cast<float>(value); }

// out[r] = sum_k x[r * ldx + k] * q[k] for R input rows against one int8 weight row: each group of
// weights is converted once and used by every input row (several tokens decoded together).
template <int R>
inline void dot_rows_f32_i8(const float* __restrict x, int64_t ldx, const int8_t* __restrict q, int64_t n,
                            float* out) {
  int64_t k = 0;
  float total[R] = {};
#if defined(GROK1_AVX512)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + k + GROK1_PREFETCH), _MM_HINT_NTA);
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), w, acc[r]);
  }
  for (int r = 0; r < R; ++r) total[r] = _mm512_reduce_add_ps(acc[r]);
#endif
  for (; k < n; ++k)
    for (int r = 0; r < R; ++r) total[r] += x[r * ldx + k] * static_cast<float>(q[k]);
  for (int r = 0; r < R; ++r) out[r] = total[r];
}

#if defined(GROK1_AVX512) && defined(__AVX512BF16__)
#define GROK1_BF16_DOT 1
// out[r] = sum_k x[r, k] * w[k] for R rows of bfloat16 activations (xb: their bits) against one weight
// row, by vdpbf16ps: products exact, only the order of the float32 additions differs from FMAs.
// `group(k)` gives weights k..k+31 as bfloat16 (and prefetches ahead); `value(j)` weight j as float,
// for a tail shorter than 32. Two accumulators per row, so consecutive vdpbf16ps do not wait on each
// other's result.
template <int R, typename Group, typename Value>
inline void dot_rows_bf16(const uint16_t* __restrict xb, int64_t ldx, int64_t n, Group group, Value value,
                          float* out) {
  int64_t k = 0;
  __m512 acc[R], acc2[R];
  for (int r = 0; r < R; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
  for (; k + 64 <= n; k += 64) {
    const __m512bh w0 = group(k), w1 = group(k + 32);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_dpbf16_ps(acc[r], w0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + r * ldx + k)));
      acc2[r] = _mm512_dpbf16_ps(acc2[r], w1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + r * ldx + k + 32)));
    }
  }
  for (; k + 32 <= n; k += 32) {
    const __m512bh w = group(k);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], w, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + r * ldx + k)));
  }
  for (int r = 0; r < R; ++r) {
    float total = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
    for (int64_t j = k; j < n; ++j) {
      uint32_t bits = static_cast<uint32_t>(xb[r * ldx + j]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      total += v * value(j);
    }
    out[r] = total;
  }
}

// int8 weights: each group of 32 converted to bfloat16 (exactly) once for all R rows.
template <int R>
inline void dot_rows_bf16_i8(const uint16_t* __restrict xb, int64_t ldx, const int8_t* __restrict q, int64_t n,
                             float* out) {
  auto group = [q](int64_t at) {
    if ((at & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + at + GROK1_PREFETCH), _MM_HINT_NTA);
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + at))));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + at + 16))));
    return _mm512_cvtne2ps_pbh(high, low);  // values at..at+31 in order
  };
  dot_rows_bf16<R>(xb, ldx, n, group, [q](int64_t j) { return static_cast<float>(q[j]); }, out);
}

// bfloat16 weights (the output head): straight from memory, no conversion.
template <int R>
inline void dot_rows_bf16_bf16(const uint16_t* __restrict xb, int64_t ldx, const at::BFloat16* __restrict w, int64_t n,
                               float* out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(w);
  auto group = [bits](int64_t at) {
    if ((at & 63) == 0) {  // both cache lines of the next 64 values, ahead of their loads
      _mm_prefetch(reinterpret_cast<const char*>(bits + at + GROK1_PREFETCH), _MM_HINT_NTA);
      _mm_prefetch(reinterpret_cast<const char*>(bits + at + 32 + GROK1_PREFETCH), _MM_HINT_NTA);
    }
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(bits + at));
  };
  dot_rows_bf16<R>(xb, ldx, n, group, [w](int64_t j) { return static_cast<float>(w[j]); }, out);
}
#endif

// y[m, n] = sum_b s[b, n] * sum_k x[m, b*Kb + k] * q[b, n, k] for n in [begin, end). Block-outer
// order: each block's rows [begin, end) are one contiguous range, read front to back. Several input
// rows share each weight row, up to 8 at a time.
inline void blocked_rows(const float* x, const uint16_t* xb, int64_t M, int64_t K, const int8_t* q,
                         const at::BFloat16* s, int64_t blocks, int64_t N, int64_t begin, int64_t end, float* y) {
  const int64_t kb = K / blocks;
#if defined(GROK1_BF16_DOT)
  if (xb != nullptr && M >= 2) {  // several bfloat16 rows: the cheaper vdpbf16ps products
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.0f;
    float dots[8];
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t n = begin; n < end; ++n) {
        const int8_t* row = q + (b * N + n) * kb;
        const float scale = bf16_to_float(s[b * N + n]);
        for (int64_t m = 0; m < M; m += 8) {  // up to 8 rows per pass: each weight converted once per pass
          const int rows = static_cast<int>(std::min<int64_t>(8, M - m));
          const uint16_t* xr = xb + m * K + b * kb;
          switch (rows) {
            case 1: dot_rows_bf16_i8<1>(xr, K, row, kb, dots); break;
            case 2: dot_rows_bf16_i8<2>(xr, K, row, kb, dots); break;
            case 3: dot_rows_bf16_i8<3>(xr, K, row, kb, dots); break;
            case 4: dot_rows_bf16_i8<4>(xr, K, row, kb, dots); break;
            case 5: dot_rows_bf16_i8<5>(xr, K, row, kb, dots); break;
            case 6: dot_rows_bf16_i8<6>(xr, K, row, kb, dots); break;
            case 7: dot_rows_bf16_i8<7>(xr, K, row, kb, dots); break;
            default: dot_rows_bf16_i8<8>(xr, K, row, kb, dots); break;
          }
          for (int r = 0; r < rows; ++r) y[(m + r) * N + n] += scale * dots[r];
        }
      }
    }
    return;
  }
#endif
  (void)xb;
  for (int64_t n = begin; n < end; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.0f;
  float dots[8];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = q + (b * N + n) * kb;
      const float scale = bf16_to_float(s[b * N + n]);
      int64_t m = 0;
      if (M == 1) {
        y[n] += scale * dot_f32_i8(x + b * kb, row, kb);
        continue;
      }
      for (; m + 8 <= M; m += 8) {
        dot_rows_f32_i8<8>(x + m * K + b * kb, K, row, kb, dots);
        for (int r = 0; r < 8; ++r) y[(m + r) * N + n] += scale * dots[r];
      }
      for (; m + 4 <= M; m += 4) {
        dot_rows_f32_i8<4>(x + m * K + b * kb, K, row, kb, dots);
        for (int r = 0; r < 4; ++r) y[(m + r) * N + n] += scale * dots[r];
      }
      for (; m + 2 <= M; m += 2) {
        dot_rows_f32_i8<2>(x + m * K + b * kb, K, row, kb, dots);
        for (int r = 0; r < 2; ++r) y[(m + r) * N + n] += scale * dots[r];
      }
      for (; m < M; ++m) y[m * N + n] += scale * dot_f32_i8(x + m * K + b * kb, row, kb);
    }
  }
}

int64_t grain_for(int64_t n) {
  // Enough columns per task that the per-task cost stays small next to the bytes it reads.
  return std::max<int64_t>(16, n / (4 * std::max(1, at::get_num_threads())));
}

// x as float32 (rows are short: converting here avoids a separate tensor operation per call).
std::vector<float> as_float(const torch::Tensor& x) {
  const int64_t n = x.numel();
  std::vector<float> out(n);
  if (x.scalar_type() == torch::kFloat32) {
    auto c = x.contiguous();
    std::copy(c.data_ptr<float>(), c.data_ptr<float>() + n, out.begin());
  } else if (x.scalar_type() == torch::kBFloat16) {
    auto c = x.contiguous();
    const at::BFloat16* p = c.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    auto c = x.to(torch::kFloat32).contiguous();
    std::copy(c.data_ptr<float>(), c.data_ptr<float>() + n, out.begin());
  }
  return out;
}

inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

constexpr int64_t kGroup = 32;  // int4 values per scale

// One matrix: int8 with row-block scales, or int4 with group scales; one expert of a stack or a plain
// matrix (expert -1).
struct Matrix {
  bool int4 = false;
  const int8_t* q = nullptr;      // int8: [blocks, n, kb]
  const uint8_t* p = nullptr;     // int4: [n, groups, 16]
  const at::BFloat16* s = nullptr;  // int8: [blocks, n]; int4: [n, groups]
  int64_t blocks = 1, n = 0, kb = 0, groups = 0;
  int64_t in_features() const { return int4 ? groups * kGroup : blocks * kb; }
};

Matrix matrix_of(const torch::Tensor& w, const torch::Tensor& s, int64_t expert) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous on the CPU");
  TORCH_CHECK(s.scalar_type() == torch::kBFloat16 && s.is_contiguous(), "scales must be contiguous bfloat16");
  const bool int4 = w.scalar_type() == torch::kUInt8;
  TORCH_CHECK(int4 || w.scalar_type() == torch::kInt8, "weights must be int8 or packed int4 (uint8)");
  TORCH_CHECK(w.dim() == s.dim() + 1 && (w.dim() == 3 || w.dim() == 4), "weights must be [(E,) a, b, c] with scales [(E,) a, b]");
  for (int64_t i = 0; i < s.dim(); ++i) TORCH_CHECK(w.size(i) == s.size(i), "scales do not match the weights");
  const int64_t lead = w.dim() - 3;
  int64_t offset = 0;
  if (lead == 1) {
    TORCH_CHECK(expert >= 0 && expert < w.size(0), "expert index out of range");
    offset = expert;
  } else {
    TORCH_CHECK(expert < 0, "an expert index needs a stack of experts");
  }
  Matrix m;
  m.int4 = int4;
  const int64_t a = w.size(lead), b = w.size(lead + 1), c = w.size(lead + 2);
  if (int4) {
    TORCH_CHECK(c == kGroup / 2, "packed int4 weights hold 16 bytes per group");
    m.n = a;
    m.groups = b;
    m.p = w.data_ptr<uint8_t>() + offset * a * b * c;
  } else {
    m.blocks = a;
    m.n = b;
    m.kb = c;
    m.q = w.data_ptr<int8_t>() + offset * a * b * c;
  }
  m.s = s.data_ptr<at::BFloat16>() + offset * a * b;
  return m;
}

// The activations as the kernels read them: float32, and for int4 weights also quantised to int8 per
// group of 32 in the order the packed bytes hold values (elements 0..15 of a group in `lo`, 16..31 in
// `hi`), with each group's scale and the per-lane correction for the +8 offset of the stored values.
struct Input {
  int64_t m = 0, k = 0;
  std::vector<float> xf;
  bool bf16_values = false;  // every value of xf is a bfloat16 (the usual case: bf16 activations)
  std::vector<uint16_t> xb;  // their bits, made on demand for the bfloat16 dot products
  bool quantised = false;

  void make_bf16() {
    if (!bf16_values || static_cast<int64_t>(xb.size()) == m * k) return;
    xb.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &xf[i], sizeof bits);
      xb[i] = static_cast<uint16_t>(bits >> 16);  // exact: the low half is zero
    }
  }

  std::vector<int8_t> lo, hi;
  std::vector<float> dx;
  std::vector<int32_t> corr;  // per 4-byte lane of a group: -8 * (sum of the 4 lo + 4 hi values it meets)

  void quantise() {
    if (quantised) return;
    allocate_quantised();
    quantise_groups(0, k / kGroup);
  }

  void allocate_quantised() {
    TORCH_CHECK(k % kGroup == 0, "int4 weights need the input size to be a multiple of 32");
    const int64_t groups = k / kGroup;
    lo.resize(m * groups * 16);
    hi.resize(m * groups * 16);
    dx.resize(m * groups);
    corr.resize(m * groups * 4);
    quantised = true;
  }

  // Groups [first, last) of every row (allocate_quantised first).
  void quantise_groups(int64_t first, int64_t last) {
    const int64_t groups = k / kGroup;
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t g = r * groups + first; g < r * groups + last; ++g) {
        const float* x = xf.data() + g * kGroup;
        float absmax = 0.0f;
        for (int64_t j = 0; j < kGroup; ++j) absmax = std::max(absmax, std::fabs(x[j]));
        const float d = absmax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        dx[g] = d;
        int8_t v[kGroup];
        for (int64_t j = 0; j < kGroup; ++j)
          v[j] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(x[j] * inv))));
        for (int64_t j = 0; j < 16; ++j) {
          lo[g * 16 + j] = v[j];
          hi[g * 16 + j] = v[16 + j];
        }
        for (int64_t lane = 0; lane < 4; ++lane) {
          int32_t sum = 0;
          for (int64_t j = 0; j < 4; ++j) sum += v[lane * 4 + j] + v[16 + lane * 4 + j];
          corr[g * 4 + lane] = -8 * sum;
        }
      }
    }
  }
};

Input input_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  Input in;
  in.m = x.size(0);
  in.k = x.size(1);
  in.xf = as_float(x);
  in.bf16_values = x.scalar_type() == torch::kBFloat16;
  if (in.bf16_values) {  // the bits as they are, rather than back from float32 later
    const auto c = x.contiguous();
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
    in.xb.assign(bits, bits + in.m * in.k);
  }
  return in;
}

// sum over the groups of one int4 row: scale_g * dx_g * (sum_j (q_j + 8) * xq_j - 8 * sum_j xq_j).
inline float dot_q4(const Input& in, int64_t row, const uint8_t* __restrict p, const at::BFloat16* __restrict s,
                    int64_t groups) {
  const int8_t* xlo = in.lo.data() + row * groups * 16;
  const int8_t* xhi = in.hi.data() + row * groups * 16;
  const float* dx = in.dx.data() + row * groups;
  const int32_t* corr = in.corr.data() + row * groups * 4;
  int64_t g = 0;
  float total = 0.0f;
#if defined(GROK1_AVX512) && defined(__AVX512VNNI__)
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (; g + 4 <= groups; g += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(p + g * 16 + 2 * GROK1_PREFETCH), _MM_HINT_NTA);  // int4: as many values ahead as int8
    const __m512i bytes = _mm512_loadu_si512(p + g * 16);
    const __m512i low = _mm512_and_si512(bytes, nibble);
    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
    __m512i dot = _mm512_loadu_si512(corr + g * 4);
    dot = _mm512_dpbusd_epi32(dot, low, _mm512_loadu_si512(xlo + g * 16));
    dot = _mm512_dpbusd_epi32(dot, high, _mm512_loadu_si512(xhi + g * 16));
    const __m128i scale_bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + g));
    const __m128 scales = _mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(scale_bits), 16)), _mm_loadu_ps(dx + g));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales)), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; g < groups; ++g) {
    int32_t dot = corr[g * 4] + corr[g * 4 + 1] + corr[g * 4 + 2] + corr[g * 4 + 3];
    for (int64_t j = 0; j < 16; ++j)
      dot += static_cast<int32_t>(p[g * 16 + j] & 0x0F) * xlo[g * 16 + j] + static_cast<int32_t>(p[g * 16 + j] >> 4) * xhi[g * 16 + j];
    total += static_cast<float>(s[g]) * dx[g] * static_cast<float>(dot);
  }
  return total;
}

// y[r, n] (leading dimension w.n) for the columns n in [begin, end).
void matrix_rows(const Matrix& w, Input& in, int64_t begin, int64_t end, float* y) {
  if (w.int4) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t r = 0; r < in.m; ++r)
        y[r * w.n + n] = dot_q4(in, r, w.p + n * w.groups * 16, w.s + n * w.groups, w.groups);
  } else {
    blocked_rows(in.xf.data(), in.xb.empty() ? nullptr : in.xb.data(), in.m, in.k, w.q, w.s, w.blocks, w.n, begin, end, y);
  }
}

void check_input(const Matrix& w, Input& in) {
  TORCH_CHECK(in.k == w.in_features(), "input size ", in.k, " does not match the weights' ", w.in_features());
  if (w.int4) in.quantise();
#if defined(GROK1_BF16_DOT)
  if (!w.int4 && in.m >= 2) in.make_bf16();
#endif
}

// Several matrices on the same input in one parallel pass: their output columns laid end to end and
// split among the threads.
void linears_into(const std::vector<Matrix>& ws, Input& in, const std::vector<float*>& ys) {
  int64_t total = 0;
  for (const auto& w : ws) {
    check_input(w, in);
    total += w.n;
  }
  at::parallel_for(0, total, grain_for(total), [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + ws[i].n);
      if (lo < hi) matrix_rows(ws[i], in, lo - offset, hi - offset, ys[i]);
      offset += ws[i].n;
    }
  });
}

void linear_into(const Matrix& w, Input& in, float* y) {
  check_input(w, in);
  at::parallel_for(0, w.n, grain_for(w.n), [&](int64_t begin, int64_t end) { matrix_rows(w, in, begin, end, y); });
}

// out[r, n] = gelu_tanh(x W_gate) * (x W_up), float32.
void geglu_into(const Matrix& gate, const Matrix& up, Input& in, float* out) {
  TORCH_CHECK(gate.n == up.n, "gate and up projections differ in size");
  check_input(gate, in);
  check_input(up, in);
  std::vector<float> up_out(in.m * up.n);
  const float sqrt_2_over_pi = 0.7978845608028654f;
  at::parallel_for(0, gate.n, grain_for(gate.n), [&](int64_t begin, int64_t end) {
    matrix_rows(gate, in, begin, end, out);
    matrix_rows(up, in, begin, end, up_out.data());
    for (int64_t r = 0; r < in.m; ++r) {
      for (int64_t n = begin; n < end; ++n) {
        const float g = out[r * gate.n + n], u = up_out[r * gate.n + n];
        const float inner = sqrt_2_over_pi * (g + 0.044715f * g * g * g);
        out[r * gate.n + n] = 0.5f * g * (1.0f + std::tanh(inner)) * u;
      }
    }
  });
}

}  // namespace

// x [M, K] (any float dtype) @ one matrix (expert -1) or one expert of a stack -> [M, N], float32 or
// x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t expert, bool float_out) {
  const Matrix mat = matrix_of(w, s, expert);
  Input in = input_of(x);
  auto y = torch::empty({in.m, mat.n}, torch::kFloat32);
  linear_into(mat, in, y.data_ptr<float>());
  return float_out ? y : y.to(x.scalar_type());
}

// x [M, K] @ w.T for a bfloat16 matrix w [N, K] (the tied output head), float32 accumulation, result
// rounded to bfloat16.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kBFloat16 && w.size(1) == x.size(1),
              "w must be a contiguous bfloat16 [N, K] matching x");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto y = torch::empty({m, n}, torch::kBFloat16);
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
#if defined(GROK1_BF16_DOT)
  if (x.scalar_type() == torch::kBFloat16) {
    const auto xc = x.contiguous();
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, grain_for(n), [&](int64_t begin, int64_t end) {
      float dots[8];
      for (int64_t r = begin; r < end; ++r) {
        int64_t i = 0;
        for (; i + 8 <= m; i += 8) {
          dot_rows_bf16_bf16<8>(xb + i * k, k, wp + r * k, k, dots);
          for (int j = 0; j < 8; ++j) yp[(i + j) * n + r] = at::BFloat16(dots[j]);
        }
        for (; i + 4 <= m; i += 4) {
          dot_rows_bf16_bf16<4>(xb + i * k, k, wp + r * k, k, dots);
          for (int j = 0; j < 4; ++j) yp[(i + j) * n + r] = at::BFloat16(dots[j]);
        }
        for (; i < m; ++i) {
          dot_rows_bf16_bf16<1>(xb + i * k, k, wp + r * k, k, dots);
          yp[i * n + r] = at::BFloat16(dots[0]);
        }
      }
    });
    return y;
  }
#endif
  const auto xf = as_float(x);
  at::parallel_for(0, n, grain_for(n), [&](int64_t begin, int64_t end) {
    float dots[8];
    for (int64_t r = begin; r < end; ++r) {
      int64_t i = 0;
      for (; i + 8 <= m; i += 8) {
        dot_rows_f32_bf16<8>(xf.data() + i * k, k, wp + r * k, k, dots);
        for (int j = 0; j < 8; ++j) yp[(i + j) * n + r] = at::BFloat16(dots[j]);
      }
      for (; i + 4 <= m; i += 4) {
        dot_rows_f32_bf16<4>(xf.data() + i * k, k, wp + r * k, k, dots);
        for (int j = 0; j < 4; ++j) yp[(i + j) * n + r] = at::BFloat16(dots[j]);
      }
      for (; i < m; ++i) yp[i * n + r] = at::BFloat16(dot_f32_bf16(xf.data() + i * k, wp + r * k, k));
    }
  });
  return y;
}

// The gated half of a GeGLU expert in one pass over both matrices:
// gelu_tanh(x @ W_gate) * (x @ W_up), computed in float32 and returned in x's dtype.
torch::Tensor geglu(torch::Tensor x, torch::Tensor w_gate, torch::Tensor s_gate, torch::Tensor w_up,
                    torch::Tensor s_up, int64_t expert) {
  const Matrix gate = matrix_of(w_gate, s_gate, expert), up = matrix_of(w_up, s_up, expert);
  Input in = input_of(x);
  auto out = torch::empty({in.m, gate.n}, torch::kFloat32);
  geglu_into(gate, up, in, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

namespace {

// out = T(scale * x * rsqrt(mean(x^2) + eps)) for one row of length d.
inline void rms_norm_row(const float* x, const float* scale, int64_t d, double eps, at::BFloat16* out) {
  float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < d; ++i) sum_sq += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(d) + static_cast<float>(eps));
  for (int64_t i = 0; i < d; ++i) out[i] = at::BFloat16(scale[i] * (x[i] * inv));
}

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == torch::kBFloat16,
              what, " must be a contiguous bfloat16 CPU matrix");
}

}  // namespace

// RMS norm of each row of h (bfloat16 [N, D]) with a float32 scale.
torch::Tensor rms_norm(torch::Tensor h, torch::Tensor scale, double eps) {
  check_rows(h, "h");
  auto sf = scale.to(torch::kFloat32).contiguous();
  const int64_t n = h.size(0), d = h.size(1);
  auto out = torch::empty_like(h);
  std::vector<float> row(d);
  for (int64_t r = 0; r < n; ++r) {
    const at::BFloat16* src = h.data_ptr<at::BFloat16>() + r * d;
    for (int64_t i = 0; i < d; ++i) row[i] = static_cast<float>(src[i]);
    rms_norm_row(row.data(), sf.data_ptr<float>(), d, eps, out.data_ptr<at::BFloat16>() + r * d);
  }
  return out;
}

// The sandwich norm's second half: h + rms_norm(y, post_scale), then optionally the next block's
// pre-norm of that sum. y is rounded to bfloat16 first (a MoE output is float32 until then).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor h, torch::Tensor y, torch::Tensor post_scale,
                                        c10::optional<torch::Tensor> next_scale, double eps) {
  check_rows(h, "h");
  TORCH_CHECK(y.sizes() == h.sizes(), "the residual and the block output differ in shape");
  auto yb = y.to(torch::kBFloat16).contiguous();
  auto post = post_scale.to(torch::kFloat32).contiguous();
  const int64_t n = h.size(0), d = h.size(1);
  auto h_out = torch::empty_like(h);
  std::vector<float> row(d);
  std::vector<at::BFloat16> normed(d);
  for (int64_t r = 0; r < n; ++r) {
    const at::BFloat16* yr = yb.data_ptr<at::BFloat16>() + r * d;
    for (int64_t i = 0; i < d; ++i) row[i] = static_cast<float>(yr[i]);
    rms_norm_row(row.data(), post.data_ptr<float>(), d, eps, normed.data());
    const at::BFloat16* hr = h.data_ptr<at::BFloat16>() + r * d;
    at::BFloat16* out = h_out.data_ptr<at::BFloat16>() + r * d;
    for (int64_t i = 0; i < d; ++i) out[i] = at::BFloat16(static_cast<float>(hr[i]) + static_cast<float>(normed[i]));
  }
  if (!next_scale.has_value()) return {h_out, h_out};
  return {h_out, rms_norm(h_out, *next_scale, eps)};
}

#if defined(GROK1_AVX512)
// e^x for float32 lanes (Cephes' polynomial after a reduction by ln 2; within 2 ulp).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.37626f)), _mm512_set1_ps(-88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(poly, n);
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)), and x (1 - x^2/3) near 0 where that loses precision.
inline __m512 tanh_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp_ps(_mm512_add_ps(ax, ax));
  const __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  const __m512 small = _mm512_mul_ps(ax, _mm512_fnmadd_ps(_mm512_mul_ps(ax, ax), _mm512_set1_ps(1.0f / 3.0f), _mm512_set1_ps(1.0f)));
  const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(4e-3f), _CMP_LT_OQ), big, small);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
                                             _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000))));
}
#endif

// row[s] <- softmax over the visible slots of cap * tanh(row[s] / cap) (0 where not visible).
inline void softcap_softmax(float* row, const uint8_t* visible, int64_t n, float cap) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t s = 0;
#if defined(GROK1_AVX512)
  const __m512 capv = _mm512_set1_ps(cap), inv_cap = _mm512_set1_ps(1.0f / cap);
  for (; s + 16 <= n; s += 16) {
    const __m512 capped = _mm512_mul_ps(capv, tanh_ps(_mm512_mul_ps(_mm512_loadu_ps(row + s), inv_cap)));
    _mm512_storeu_ps(row + s, capped);
  }
#endif
  for (; s < n; ++s) row[s] = cap * std::tanh(row[s] / cap);
  for (s = 0; s < n; ++s)
    if (visible[s]) top = std::max(top, row[s]);
  float total = 0.0f;
  s = 0;
#if defined(GROK1_AVX512)
  const __m512 topv = _mm512_set1_ps(top);
  for (; s + 16 <= n; s += 16) _mm512_storeu_ps(row + s, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + s), topv)));
#endif
  for (; s < n; ++s) row[s] = std::exp(row[s] - top);
  for (s = 0; s < n; ++s) {
    if (!visible[s]) row[s] = 0.0f;
    total += row[s];
  }
  const float inv = 1.0f / total;
  for (s = 0; s < n; ++s) row[s] *= inv;
}

// One query per row. q [B, Hq*dk], k [B, Hkv*dk], v [B, Hkv*dv] (bfloat16, before RoPE); cos, sin
// [B, dk] float32; caches [B, Hkv, S, d] bfloat16; positions [B] int64; key_valid [B, S] bool.
// Applies RoPE (half split) to q and k, writes k and v at each row's position, and attends to the
// slots s < span with s <= position and key_valid (none visible: uniform over the span, as a fully
// masked softmax gives). Scores are rounded to bfloat16, scaled, soft-capped and softmaxed in float32;
// probabilities are rounded to bfloat16 before the weighted sum of values. Returns [B, Hq*dv].
torch::Tensor attention_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor positions, torch::Tensor key_valid, int64_t span,
                               double multiplier, double cap) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == torch::kBFloat16 && v_cache.scalar_type() == torch::kBFloat16,
              "caches must be contiguous bfloat16 [B, Hkv, S, d]");
  const int64_t batch = q.size(0), hkv = k_cache.size(1), slots = k_cache.size(2), dk = k_cache.size(3);
  const int64_t dv = v_cache.size(3), hq = q.size(1) / dk, group = hq / hkv;
  TORCH_CHECK(k.size(1) == hkv * dk && v.size(1) == hkv * dv && hq % hkv == 0 && span <= slots, "attention shapes do not match the cache");
  auto cosf = cos.to(torch::kFloat32).contiguous(), sinf = sin.to(torch::kFloat32).contiguous();
  auto pos = positions.to(torch::kInt64).contiguous();
  auto valid = key_valid.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const bool* vp = valid.data_ptr<bool>();
  const int64_t half = dk / 2;

  // RoPE in float32, rounded to bfloat16 (the rotated q and k are bfloat16 in the model).
  auto rotate = [&](const at::BFloat16* x, const float* c, const float* s, float* out) {
    for (int64_t i = 0; i < dk; ++i) {
      const float rotated_half = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
      out[i] = round_bf16(static_cast<float>(x[i]) * c[i] + rotated_half * s[i]);
    }
  };
  auto q_rot = torch::empty({batch, hq, dk}, torch::kFloat32);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t p = pp[b];
    TORCH_CHECK(p >= 0 && p < slots, "position beyond the KV cache");
    const float* c = cosf.data_ptr<float>() + b * dk;
    const float* s = sinf.data_ptr<float>() + b * dk;
    for (int64_t h = 0; h < hq; ++h)
      rotate(q.data_ptr<at::BFloat16>() + b * hq * dk + h * dk, c, s, q_rot.data_ptr<float>() + (b * hq + h) * dk);
    std::vector<float> k_rot(dk);
    for (int64_t h = 0; h < hkv; ++h) {
      rotate(k.data_ptr<at::BFloat16>() + b * hkv * dk + h * dk, c, s, k_rot.data());
      at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>() + ((b * hkv + h) * slots + p) * dk;
      for (int64_t i = 0; i < dk; ++i) kc[i] = at::BFloat16(k_rot[i]);
      at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>() + ((b * hkv + h) * slots + p) * dv;
      const at::BFloat16* vs = v.data_ptr<at::BFloat16>() + b * hkv * dv + h * dv;
      for (int64_t i = 0; i < dv; ++i) vc[i] = vs[i];
    }
  }

  auto out = torch::empty({batch, hq * dv}, q.options());
  const float mult = static_cast<float>(multiplier), capf = static_cast<float>(cap);
  // One task per (row, kv head): its `group` query heads share every key and value read.
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * span), key(dk), value(dv), acc(group * dv);
    std::vector<uint8_t> visible(span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, kvh = task % hkv, p = pp[b];
      const float* qr = q_rot.data_ptr<float>() + (b * hq + kvh * group) * dk;
      const at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>() + (b * hkv + kvh) * slots * dk;
      const at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>() + (b * hkv + kvh) * slots * dv;
      const bool* kv_ok = vp + b * slots;
      int64_t count = 0;
      for (int64_t s = 0; s < span; ++s) {
        visible[s] = s <= p && kv_ok[s];
        if (!visible[s]) continue;
        ++count;
        bf16_to_float_row(kc + s * dk, key.data(), dk);
        for (int64_t h = 0; h < group; ++h) {
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < dk; ++i) dot += qr[h * dk + i] * key[i];
          scores[h * span + s] = round_bf16(dot) * mult;  // the score matmul's result is bfloat16
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        float* row = scores.data() + h * span;
        if (count == 0) {  // fully masked: the softmax of equal fill values is uniform over the span
          std::fill(row, row + span, 1.0f / static_cast<float>(span));
        } else {
          softcap_softmax(row, visible.data(), span, capf);
        }
        for (int64_t s = 0; s < span; ++s) row[s] = round_bf16(row[s]);  // probabilities in bfloat16
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < span; ++s) {
        if (count != 0 && !visible[s]) continue;
        bf16_to_float_row(vc + s * dv, value.data(), dv);
        for (int64_t h = 0; h < group; ++h) {
          const float prob = scores[h * span + s];
          float* a = acc.data() + h * dv;
#pragma omp simd
          for (int64_t i = 0; i < dv; ++i) a[i] += prob * value[i];
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        at::BFloat16* o = out.data_ptr<at::BFloat16>() + (b * hq + kvh * group + h) * dv;
        for (int64_t i = 0; i < dv; ++i) o[i] = at::BFloat16(acc[h * dv + i]);
      }
    }
  });
  return out;
}

// The router: float32 logits x @ router [D, E], softmax, the k most probable experts in descending
// order (ties to the lower index, as a stable sort). Returns (gate weights [N, k]: the probabilities
// rounded to bfloat16, as the model applies them, held as float32; experts [N, k] int64).
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor router, int64_t k) {
  check_rows(x, "x");
  auto rf = router.to(torch::kFloat32).contiguous();
  const int64_t n = x.size(0), d = x.size(1), e = rf.size(1);
  TORCH_CHECK(rf.size(0) == d && k <= e, "router shape does not match");
  auto gates = torch::empty({n, k}, torch::kFloat32);
  auto experts = torch::empty({n, k}, torch::kInt64);
  std::vector<float> logits(e), row(d);
  std::vector<int64_t> order(e);
  for (int64_t r = 0; r < n; ++r) {
    const at::BFloat16* xr = x.data_ptr<at::BFloat16>() + r * d;
    for (int64_t i = 0; i < d; ++i) row[i] = static_cast<float>(xr[i]);
    std::fill(logits.begin(), logits.end(), 0.0f);
    const float* w = rf.data_ptr<float>();
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < e; ++j) logits[j] += row[i] * w[i * e + j];
    const float top = *std::max_element(logits.begin(), logits.end());
    float total = 0.0f;
    for (auto& l : logits) total += (l = std::exp(l - top));
    for (auto& l : logits) l /= total;
    for (int64_t j = 0; j < e; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
    for (int64_t j = 0; j < k; ++j) {
      gates.data_ptr<float>()[r * k + j] = round_bf16(logits[order[j]]);
      experts.data_ptr<int64_t>()[r * k + j] = order[j];
    }
  }
  return {gates, experts};
}

namespace {

// One GeGLU expert of a MoE layer: its matrices, and the rows of out its input rows go to.
struct ExpertJob {
  Matrix gate, up, down;
  std::vector<int64_t> rows;
  std::vector<double> weights;
};

// GeGLU experts on the same prepared input (rows[i] of out receives row i of `in`, for each expert):
// hidden = bf16(gelu(x Wg) * (x Wu)), y = bf16(hidden Wd), out[rows[i]] += weights[i] * y[i], the
// experts added in the order given. Two parallel passes over all of them, each thread on its own
// columns: gate/up (and, for an int4 down projection, quantising its share of the hidden
// activations), then down with the gated accumulation. No serial step between the passes.
void experts_into(const std::vector<ExpertJob>& jobs, Input& in, float* out, int64_t out_cols) {
  const int64_t m = in.m, count = static_cast<int64_t>(jobs.size());
  if (count == 0) return;
  const int64_t f = jobs[0].gate.n;
  for (const auto& job : jobs) {
    TORCH_CHECK(job.gate.n == f && job.up.n == f && job.down.in_features() == f && job.down.n == out_cols,
                "expert projections do not match");
    TORCH_CHECK(static_cast<int64_t>(job.rows.size()) == m && job.weights.size() == job.rows.size(), "one weight per row");
    check_input(job.gate, in);
    check_input(job.up, in);
  }
  std::vector<Input> hidden(count);
  for (int64_t e = 0; e < count; ++e) {
    hidden[e].m = m;
    hidden[e].k = f;
    hidden[e].xf.resize(m * f);
    hidden[e].bf16_values = true;  // rounded to bfloat16 below
    if (jobs[e].down.int4) hidden[e].allocate_quantised();
  }
  std::vector<std::vector<float>> up_outs(count, std::vector<float>(m * f));
  const float sqrt_2_over_pi = 0.7978845608028654f;
  // Column chunks of 64 (whole int4 groups), so each thread quantises exactly the groups it wrote.
  const int64_t chunk = 2 * kGroup, chunks = (f + chunk - 1) / chunk;
  at::parallel_for(0, count * chunks, std::max<int64_t>(1, grain_for(count * f) / chunk), [&](int64_t c0, int64_t c1) {
    // Each expert's share of [c0, c1) in one go: long runs of rows keep the weight streams prefetched.
    for (int64_t e = c0 / chunks; e < count && e * chunks < c1; ++e) {
      const int64_t begin = (std::max(c0, e * chunks) - e * chunks) * chunk;
      const int64_t end = std::min(f, (std::min(c1, (e + 1) * chunks) - e * chunks) * chunk);
      const ExpertJob& job = jobs[e];
      float* h = hidden[e].xf.data();
      float* u = up_outs[e].data();
      matrix_rows(job.gate, in, begin, end, h);
      matrix_rows(job.up, in, begin, end, u);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t n = begin; n < end; ++n) {
          const float g = h[r * f + n];
          const float inner = sqrt_2_over_pi * (g + 0.044715f * g * g * g);
          h[r * f + n] = round_bf16(0.5f * g * (1.0f + std::tanh(inner)) * u[r * f + n]);  // bfloat16 input to down
        }
      }
      if (job.down.int4) hidden[e].quantise_groups(begin / kGroup, (end + kGroup - 1) / kGroup);
    }
  });
  for (int64_t e = 0; e < count; ++e) check_input(jobs[e].down, hidden[e]);  // (int4: quantised above)
  std::vector<float> y(m * out_cols);
  at::parallel_for(0, out_cols, grain_for(out_cols), [&](int64_t begin, int64_t end) {
    for (int64_t e = 0; e < count; ++e) {
      const ExpertJob& job = jobs[e];
      matrix_rows(job.down, hidden[e], begin, end, y.data());
      for (int64_t i = 0; i < m; ++i) {
        const float g = static_cast<float>(job.weights[i]);
        float* dst = out + job.rows[i] * out_cols;
        for (int64_t n = begin; n < end; ++n) dst[n] += g * round_bf16(y[i * out_cols + n]);
      }
    }
  });
}

// Rows `rows` of bfloat16 x as kernel input.
Input rows_of(const torch::Tensor& x, const std::vector<int64_t>& rows) {
  const int64_t d = x.size(1);
  Input in;
  in.m = static_cast<int64_t>(rows.size());
  in.k = d;
  in.xf.resize(in.m * d);
  in.bf16_values = true;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < in.m; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < x.size(0), "row index out of range");
    for (int64_t j = 0; j < d; ++j) in.xf[i * d + j] = static_cast<float>(xp[rows[i] * d + j]);
  }
  return in;
}

}  // namespace

// One expert of a MoE layer on the rows routed to it: hidden = bf16(gelu(x Wg) * (x Wu)),
// y = bf16(hidden Wd), out[rows[i]] += weights[i] * y[i] (x bfloat16 [N, D], out float32 [N, D]).
// The roundings are those of the fast path's separate steps (each projection returns bfloat16), so
// both give the same numbers.
void expert_add(torch::Tensor x, std::vector<int64_t> rows, std::vector<double> weights, torch::Tensor w_gate,
                torch::Tensor s_gate, torch::Tensor w_up, torch::Tensor s_up, torch::Tensor w_down,
                torch::Tensor s_down, int64_t expert, torch::Tensor out) {
  check_rows(x, "x");
  TORCH_CHECK(rows.size() == weights.size(), "one weight per row");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0),
              "out must be float32 [N, D]");
  const Matrix gate = matrix_of(w_gate, s_gate, expert), up = matrix_of(w_up, s_up, expert);
  const Matrix down = matrix_of(w_down, s_down, expert);
  Input in = rows_of(x, rows);
  experts_into({ExpertJob{gate, up, down, rows, weights}}, in, out.data_ptr<float>(), out.size(1));
}

// A decoder layer's attention half for one new token per row, as one call: pre-norm, q/k/v
// projections (rounded to bfloat16), attention_decode, output projection (bfloat16), post-norm and
// residual add, and the MoE half's pre-norm. norms = (pre, post, next); weights = (q, q scales, k, k
// scales, v, v scales, out, out scales). Returns (h, the MoE's input). Same numbers as the separate
// calls.
std::vector<torch::Tensor> attention_block(torch::Tensor h, std::vector<torch::Tensor> norms, double eps,
                                           std::vector<torch::Tensor> weights, torch::Tensor cos, torch::Tensor sin,
                                           torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor positions,
                                           torch::Tensor key_valid, int64_t span, double multiplier, double cap) {
  TORCH_CHECK(norms.size() == 3 && weights.size() == 8, "attention_block takes 3 norm scales and 4 weights with their scales");
  const auto x = rms_norm(h, norms[0], eps);
  const std::vector<Matrix> qkv = {matrix_of(weights[0], weights[1], -1), matrix_of(weights[2], weights[3], -1),
                                   matrix_of(weights[4], weights[5], -1)};
  Input in = input_of(x);
  std::vector<torch::Tensor> projected;
  for (const auto& w : qkv) projected.push_back(torch::empty({in.m, w.n}, torch::kFloat32));
  linears_into(qkv, in, {projected[0].data_ptr<float>(), projected[1].data_ptr<float>(), projected[2].data_ptr<float>()});
  // Each projection's output is bfloat16, as from the separate calls.
  const auto q = projected[0].to(torch::kBFloat16), k = projected[1].to(torch::kBFloat16), v = projected[2].to(torch::kBFloat16);
  const auto attended = attention_decode(q, k, v, cos, sin, k_cache, v_cache, positions, key_valid, span, multiplier, cap);
  const auto out = linear(attended, weights[6], weights[7], -1, false);
  return add_rms_norm(h, out, norms[1], norms[2], eps);
}

// A decoder layer's MoE half for one new token per row, as one call: routing, each selected expert on
// its rows (in order of first selection, as grok1/model.py groups them), the gated sum in float32,
// then h + post_norm(bf16(sum)). stacks = (gate, gate scales, up, up scales, down, down scales).
torch::Tensor moe_block(torch::Tensor x, torch::Tensor h, torch::Tensor router, int64_t k,
                        std::vector<torch::Tensor> stacks, torch::Tensor post_scale, double eps) {
  TORCH_CHECK(stacks.size() == 6, "moe_block takes 3 expert stacks with their scales");
  const auto routed = route(x, router, k);
  const float* gates = routed[0].data_ptr<float>();
  const int64_t* experts = routed[1].data_ptr<int64_t>();
  std::vector<int64_t> order;
  std::vector<std::vector<int64_t>> rows;
  std::vector<std::vector<double>> weights;
  for (int64_t r = 0; r < x.size(0); ++r) {
    for (int64_t slot = 0; slot < k; ++slot) {
      const int64_t e = experts[r * k + slot];
      auto at = std::find(order.begin(), order.end(), e);
      size_t index = at - order.begin();
      if (at == order.end()) {
        order.push_back(e);
        rows.emplace_back();
        weights.emplace_back();
      }
      rows[index].push_back(r);
      weights[index].push_back(gates[r * k + slot]);
    }
  }
  check_rows(x, "x");
  auto out = torch::zeros({x.size(0), x.size(1)}, torch::kFloat32);
  std::vector<int64_t> all_rows(x.size(0));
  for (int64_t r = 0; r < x.size(0); ++r) all_rows[r] = r;
  // When every selected expert takes every row (always, decoding one sequence), they run together on
  // one input; otherwise one after another on their own rows. Either way each adds into out in order of
  // first selection, as the step-by-step path does.
  std::vector<ExpertJob> jobs;
  bool together = true;
  for (size_t i = 0; i < order.size(); ++i) {
    jobs.push_back(ExpertJob{matrix_of(stacks[0], stacks[1], order[i]), matrix_of(stacks[2], stacks[3], order[i]),
                             matrix_of(stacks[4], stacks[5], order[i]), rows[i], weights[i]});
    together = together && rows[i] == all_rows;
  }
  if (together) {
    Input shared = rows_of(x, all_rows);
    experts_into(jobs, shared, out.data_ptr<float>(), out.size(1));
  } else {
    for (const auto& job : jobs) {
      Input in = rows_of(x, job.rows);
      experts_into({job}, in, out.data_ptr<float>(), out.size(1));
    }
  }
  return add_rms_norm(h, out, post_scale, c10::nullopt, eps)[0];
}

// Every decoder layer of a decode step, one after another (`attention_block` then `moe_block` each):
// one call per step instead of two per layer. layers[i] = (pre-norm, post-norm, MoE pre-norm scales;
// q, k, v, out projections with their scales; router; gate, up, down stacks with their scales; MoE
// post-norm scale): 19 tensors.
torch::Tensor decode_layers(torch::Tensor h, std::vector<std::vector<torch::Tensor>> layers,
                            std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor positions, torch::Tensor key_valid,
                            int64_t span, double eps, double multiplier, double cap, int64_t top_k) {
  TORCH_CHECK(k_caches.size() == layers.size() && v_caches.size() == layers.size(), "one KV cache per layer");
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& t = layers[i];
    TORCH_CHECK(t.size() == 19, "a layer takes 19 tensors");
    const auto halves = attention_block(h, {t[0], t[1], t[2]}, eps, {t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10]},
                                        cos, sin, k_caches[i], v_caches[i], positions, key_valid, span, multiplier, cap);
    h = moe_block(halves[1], halves[0], t[11], top_k, {t[12], t[13], t[14], t[15], t[16], t[17]}, t[18], eps);
  }
  return h;
}

// The vector instructions this build uses: "avx512", "avx2" or "none".
std::string simd() {
#if defined(GROK1_AVX512)
  return "avx512";
#elif defined(GROK1_AVX2)
  return "avx2";
#else
  return "none";
#endif
}

// Whether this build has the int4 kernel (AVX-512 VNNI); elsewhere int4 goes through PyTorch's.
bool has_int4() {
#if defined(GROK1_AVX512) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels run without the GIL, as PyTorch's own operations do: a server's other threads (HTTP,
  // streaming) go on while a decode step computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "x @ W for an int8 (blocked scales) or int4 (group scales) W", nogil);
  m.def("geglu", &geglu, "gelu_tanh(x @ W_gate) * (x @ W_up) in one pass over both", nogil);
  m.def("expert_add", &expert_add, "one GeGLU expert on its rows, gated and added into out", nogil);
  m.def("bf16_linear", &bf16_linear, "x @ w.T for a bfloat16 w, bfloat16 result", nogil);
  m.def("rms_norm", &rms_norm, "RMS norm of bfloat16 rows", nogil);
  m.def("add_rms_norm", &add_rms_norm, "h + rms_norm(y), and the next pre-norm of the sum", nogil);
  m.def("attention_decode", &attention_decode, "RoPE, KV-cache write and attention for one query per row", nogil);
  m.def("route", &route, "router softmax and top-k", nogil);
  m.def("attention_block", &attention_block, "a decoder layer's attention half for one token per row", nogil);
  m.def("moe_block", &moe_block, "a decoder layer's MoE half for one token per row", nogil);
  m.def("decode_layers", &decode_layers, "every decoder layer of a decode step", nogil);
  m.def("has_int4", &has_int4, "whether the int4 kernel was built", nogil);
  m.def("simd", &simd, "the vector instructions of this build");
}
