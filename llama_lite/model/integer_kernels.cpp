// Integer products for the decode step on a CPU, built on the user's machine by integer_kernels.py
// (g++ -O3 -march=native), so one source covers AVX512-VNNI, AVX2 and others:
// - llama_lite::q4_mm: 4-bit weights (GGUF's Q4_1: groups of 32, a scale and an offset each) times
//   float32 inputs rounded to 8 bits per group of 32 (the layers);
// - llama_lite::int8_mm: int8 rows times int8 rows, int32 sums: torch._int_mm(x, w.t()) read at the
//   memory's speed at one row (the output head); from GEMM_ROWS rows on, _int_mm itself, the same
//   exact sums (SmolLM2's head at 64 rows: 8 ms through _int_mm, 37 through the loop here; Zen 4).
//
// q4_mm:
// y[r, n] = sum over groups g of  scale[n, g] * step[r, g] * S[r, n, g]  +  offset[n, g] * sum[r, g]
// where S is the integer dot product of the group's 4-bit weights (0..15) and the row's int8 values,
// step[r, g] = max |x| / 127 over the group and sum[r, g] = step[r, g] * (the int8 values' sum): the
// weights times the inputs as rounded, as llama.cpp's Q8_1 products. S is exact, and the float
// terms are added in the same order for every row, output, thread count and instruction set: a
// row's outputs never depend on the other rows of the call.
//
// Weight layout (integer_kernels.pack): blocks of 16 output rows; a block holds its groups one after
// another, 256 bytes each: 4 chunks of 64 bytes, chunk j's byte (4 * lane + b) holding weight
// 8j + b of the group in its low nibble and 8j + 4 + b in its high one. So one 64-byte load gives
// 16 outputs x 4 consecutive inputs per nibble, the shape of AVX512-VNNI's u8 x s8 dot product.
// Scales: (blocks, groups, 2, 16) float16, the scales then the offsets of the block's 16 rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;        // inputs per scale and offset
constexpr int64_t LANES = 16;        // output rows in a block
constexpr int64_t GROUP_BYTES = 256; // a block's group of weights
constexpr int ROWS = 4;              // input rows multiplied at once against a block
constexpr int64_t GEMM_ROWS = 6;     // int8_mm's rows from which PyTorch's GEMM is faster (~3.4 ms each at 6, Zen 4)

// Each input row's groups as int8 values, their steps, and the sums of the rounded values.
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* step, float* sum) {
  const int64_t groups = k / GROUP;
  for (int64_t i = 0; i < m * groups; ++i) {
    const float* v = x + i * GROUP;
    float amax = 0.f;
    for (int j = 0; j < GROUP; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t total = 0;
    for (int j = 0; j < GROUP; ++j) {
      q[i * GROUP + j] = (int8_t)std::nearbyint(v[j] * inv);
      total += q[i * GROUP + j];
    }
    step[i] = amax / 127.f;
    sum[i] = (float)total * step[i];
  }
}

int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
// One group's integer sums for 16 output rows and `nrows` input rows (xq: each row's 32 values).
void group_sums(const uint8_t* w, const int8_t* const* xq, int nrows, int32_t out[ROWS][LANES]) {
#if defined(__AVX2__)
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {  // lanes 0-7, then 8-15
    __m256i acc[ROWS];
    for (int r = 0; r < nrows; ++r) acc[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 64 * j + 32 * h));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < nrows; ++r) {
        // u8 x s8 pairs summed to int16 (at most 2 * 15 * 127: never saturates), pairs of those to int32
        const __m256i a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(four_bytes(xq[r] + 8 * j)));
        const __m256i b = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four_bytes(xq[r] + 8 * j + 4)));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_add_epi16(a, b), ones));
      }
    }
    for (int r = 0; r < nrows; ++r) _mm256_storeu_si256((__m256i*)(out[r] + 8 * h), acc[r]);
  }
#else
  for (int r = 0; r < nrows; ++r)
    for (int l = 0; l < LANES; ++l) {
      int32_t s = 0;
      for (int j = 0; j < 4; ++j)
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = w[64 * j + 4 * l + b];
          s += (byte & 15) * xq[r][8 * j + b] + (byte >> 4) * xq[r][8 * j + 4 + b];
        }
      out[r][l] = s;
    }
#endif
}
#endif

// One block of 16 output rows for `nrows` input rows, written to y[r * y_stride + lane].
void block_rows(const uint8_t* w, const c10::Half* sc, int64_t groups, const int8_t* const* xq, const float* step,
                const float* sum, int nrows, float* y, int64_t y_stride) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[ROWS];
  for (int r = 0; r < nrows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g, w += GROUP_BYTES, sc += 2 * LANES) {
    __m512i dot[ROWS];
    for (int r = 0; r < nrows; ++r) dot[r] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(w + 64 * j);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < nrows; ++r) {
        const int8_t* x = xq[r] + g * GROUP + 8 * j;
        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(four_bytes(x)));
        dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(four_bytes(x + 4)));
      }
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sc));
    const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + LANES)));
    for (int r = 0; r < nrows; ++r) {
      const __m512 with_offset = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[r * groups + g]), acc[r]);
      const __m512 row_scale = _mm512_mul_ps(scale, _mm512_set1_ps(step[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), row_scale, with_offset);
    }
  }
  for (int r = 0; r < nrows; ++r) _mm512_storeu_ps(y + r * y_stride, acc[r]);
#else
  float acc[ROWS][LANES] = {};
  int32_t dot[ROWS][LANES];
  for (int64_t g = 0; g < groups; ++g, w += GROUP_BYTES, sc += 2 * LANES) {
    const int8_t* x[ROWS];
    for (int r = 0; r < nrows; ++r) x[r] = xq[r] + g * GROUP;
    group_sums(w, x, nrows, dot);
    for (int r = 0; r < nrows; ++r) {
      const float d = step[r * groups + g], s = sum[r * groups + g];
      for (int l = 0; l < LANES; ++l) {
        const float with_offset = std::fma((float)sc[LANES + l], s, acc[r][l]);
        acc[r][l] = std::fma((float)dot[r][l], (float)sc[l] * d, with_offset);
      }
    }
  }
  for (int r = 0; r < nrows; ++r) std::copy(acc[r], acc[r] + LANES, y + r * y_stride);
#endif
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "q4_mm: x must be a contiguous (rows, in) float32 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == GROUP_BYTES && packed.is_contiguous(),
              "q4_mm: packed must be a contiguous (out / 16, in / 32, 256) uint8 tensor");
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == blocks * groups * 2 * LANES,
              "q4_mm: scales must be a contiguous (out / 16, in / 32, 2, 16) float16 tensor");
  TORCH_CHECK(groups * GROUP == k, "q4_mm: x has ", k, " columns, the weights ", groups * GROUP);
  at::Tensor out = at::empty({m, blocks * LANES}, x.options());
  if (m == 0) return out;
  std::vector<int8_t> xq(m * k);
  std::vector<float> step(m * groups), sum(m * groups);
  quantize_rows(x.data_ptr<float>(), m, k, xq.data(), step.data(), sum.data());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t nb = first; nb < last; ++nb)
      for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        const int nrows = (int)std::min<int64_t>(ROWS, m - r0);
        const int8_t* rows[ROWS];
        for (int r = 0; r < nrows; ++r) rows[r] = xq.data() + (r0 + r) * k;
        block_rows(w + nb * groups * GROUP_BYTES, sc + nb * groups * 2 * LANES, groups, rows, step.data() + r0 * groups,
                   sum.data() + r0 * groups, nrows, y + r0 * blocks * LANES + nb * LANES, blocks * LANES);
      }
  });
  return out;
}

// The dot products of `nrows` int8 rows of x (length k, values in -127..127) with one int8 row w,
// into out[r]. AVX512-VNNI and AVX2 multiply unsigned by signed bytes: |w| times x with w's sign
// moved onto x (|w| <= 128, |x| <= 127: a pair of products fits AVX2's int16 sums).
void int8_dots(const int8_t* w, const int8_t* const* x, int nrows, int64_t k, int32_t* out) {
  int64_t i = 0;
  int32_t tail[ROWS] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i acc[ROWS];
  for (int r = 0; r < nrows; ++r) acc[r] = _mm512_setzero_si512();
  for (; i + 64 <= k; i += 64) {
    const __m512i v = _mm512_loadu_si512(w + i);
    const __m512i magnitude = _mm512_abs_epi8(v);
    const __mmask64 negative = _mm512_movepi8_mask(v);
    for (int r = 0; r < nrows; ++r) {
      const __m512i xv = _mm512_loadu_si512(x[r] + i);
      acc[r] = _mm512_dpbusd_epi32(acc[r], magnitude, _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv));
    }
  }
  for (int r = 0; r < nrows; ++r) tail[r] = _mm512_reduce_add_epi32(acc[r]);
#elif defined(__AVX2__)
  __m256i acc[ROWS];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < nrows; ++r) acc[r] = _mm256_setzero_si256();
  for (; i + 32 <= k; i += 32) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + i));
    const __m256i magnitude = _mm256_abs_epi8(v);
    for (int r = 0; r < nrows; ++r) {
      const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x[r] + i)), v);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xv), ones));
    }
  }
  for (int r = 0; r < nrows; ++r) {
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i*)lanes, acc[r]);
    for (int l = 0; l < 8; ++l) tail[r] += lanes[l];
  }
#endif
  for (int r = 0; r < nrows; ++r) {
    int32_t s = tail[r];
    for (int64_t j = i; j < k; ++j) s += (int32_t)w[j] * x[r][j];
    out[r] = s;
  }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar && x.is_contiguous() && x.device().is_cpu(),
              "int8_mm: x must be a contiguous (rows, in) int8 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "int8_mm: w must be a contiguous (out, in) int8 tensor as wide as x");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  if (m >= GEMM_ROWS) return at::_int_mm(x, w.t());
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kInt));
  const int8_t* xs = x.data_ptr<int8_t>();
  const int8_t* ws = w.data_ptr<int8_t>();
  int32_t* y = out.data_ptr<int32_t>();
  at::parallel_for(0, n, 64, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j)  // a weight row read once from memory for every input row
      for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        const int nrows = (int)std::min<int64_t>(ROWS, m - r0);
        const int8_t* rows[ROWS];
        for (int r = 0; r < nrows; ++r) rows[r] = xs + (r0 + r) * k;
        int32_t dots[ROWS];
        int8_dots(ws + j * k, rows, nrows, k, dots);
        for (int r = 0; r < nrows; ++r) y[(r0 + r) * n + j] = dots[r];
      }
  });
  return out;
}

}  // namespace

#ifndef NAMESPACE
#define NAMESPACE llama_lite  // tests load builds for other instruction sets beside it, under other names
#endif
TORCH_LIBRARY(NAMESPACE, m) {
  m.def("q4_mm(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("int8_mm", &int8_mm);
}
