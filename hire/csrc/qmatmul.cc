// x @ W for weights kept quantized in blocks of 32 along the input dimension (hire/quant.py), as XLA FFI
// handlers for the CPU: the way llama.cpp's CPU path multiplies Q8_0 / Q4_1 weights.
//
//   int8: q int8 [N, K], d f16 [N, K/32]: w[n, k] = d[n, k/32] * q[n, k]
//   int4: q uint8 [N, K/2], d, m f16 [N, K/32]: w[n, k] = d[n, k/32] * q4 + m[n, k/32], q4 in [0, 15], block b's
//         byte j holding element j in its low nibble and element j + 16 in its high nibble (GGUF's Q4_1 layout)
//
// Each call quantizes the activation rows x f32 [M, K] to int8 per block of 32 (scale max|x| / 127, as Q8_0), then
// takes per-block int8 dot products scaled in float: y[m, n] = sum_b dx dw idot (+ mw sum x). The products: AVX2,
// maddubs + madd (int8 weights: |w| times x with w's sign); AVX-512 VNNI, vpdpbusd (int8 weights: x + 128 times w,
// less 128 times w's sums), into the same int32 lanes, so both paths give the same floats.
// One call multiplies x by up to 4 weight matrices of one kind (q, k and v; gate and up), each into its own output, so
// x is quantized once and the threads meet once. Output rows are shared among XLA's intra-op threads; every weight row
// is read once per 8 activation rows.
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F16Matrix = ffi::Buffer<ffi::F16, 2>;
using S8Matrix = ffi::Buffer<ffi::S8, 2>;
using U8Matrix = ffi::Buffer<ffi::U8, 2>;

namespace {

constexpr int64_t kBlock = 32;
constexpr int kTile = 8;          // activation rows computed per pass over a weight row
constexpr int64_t kChunk = 32;    // output rows per unit of work handed to a thread

// Activation rows quantized per block: q int8 [M, K] (plus 128, as unsigned bytes, for int8 weights on the VNNI
// path), scale [M, K/32], sum of x [M, K/32].
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

void quantize_rows(const float* x, int64_t rows, int64_t k, QuantizedRows& out) {
  const int64_t nb = k / kBlock;
  out.q.resize(rows * k);
  out.scale.resize(rows * nb);
  out.sum.resize(rows * nb);
  for (int64_t b = 0; b < rows * nb; ++b) {
    const float* v = x + b * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(v[i]));
      sum += v[i];
    }
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < kBlock; ++i) out.q[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
    out.scale[b] = d;
    out.sum[b] = sum;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half(uint16_t h) { return _cvtsh_ss(h); }

// The 32 int8 products of an unsigned weight block `w` and a signed activation block `x`, summed in 8 int32 lanes.
inline __m256i dot_u8_s8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

// The weight matrices of one call, each multiplied by the same activation rows into its own output.
constexpr int kMaxMatrices = 4;
struct Matrix {
  const uint8_t* q;  // int8 or packed int4 weights
  const uint16_t* d;
  const uint16_t* min;  // int4 only
  float* y;
  int64_t n;
};

struct Problem {
  const QuantizedRows* x;
  bool vnni;
  int64_t m, k;
  int count = 0;
  Matrix w[kMaxMatrices];
  int64_t first_chunk[kMaxMatrices + 1] = {0};  // matrix i's output rows are chunks [first_chunk[i], first_chunk[i+1])
};

// Rows [n0, n1) of w's y for the `T` activation rows from `r0`.
template <bool kInt4, bool kVnni, int T>
void tile(const Problem& p, const Matrix& w, int64_t r0, int64_t n0, int64_t n1) {
  const int64_t nb = p.k / kBlock, row_bytes = kInt4 ? p.k / 2 : p.k;
  const int8_t* xq = p.x->q.data() + r0 * p.k;
  const float* xs = p.x->scale.data() + r0 * nb;
  const float* xsum = p.x->sum.data() + r0 * nb;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * row_bytes;
    const uint16_t* d = w.d + n * nb;
    __m256 acc[T];
    float offset[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps(), offset[t] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i wu, sign, start = _mm256_setzero_si256();
      if constexpr (kInt4) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock / 2));
        const __m128i low = _mm_set1_epi8(0x0f);
        wu = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
      } else {
        sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
        if constexpr (kVnni)  // -128 times w's sums of 4, what x's offset of 128 adds
          start = _mm256_sub_epi32(start, hire::dpbusd(start, _mm256_set1_epi8(-128), sign));
        else  // |w| times x's sign flipped where w < 0: maddubs takes an unsigned left operand
          wu = _mm256_sign_epi8(sign, sign);
      }
      const float dw = half(d[b]);
      const float mw = kInt4 ? half(w.min[n * nb + b]) : 0.f;
      for (int t = 0; t < T; ++t) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * p.k + b * kBlock)), dot;
        if constexpr (kVnni && kInt4) dot = hire::dpbusd(start, wu, xv);
        else if constexpr (kVnni) dot = hire::dpbusd(start, xv, sign);
        else if constexpr (kInt4) dot = dot_u8_s8(wu, xv);
        else dot = dot_u8_s8(wu, _mm256_sign_epi8(xv, sign));
        const __m256 prod = _mm256_cvtepi32_ps(dot);
        acc[t] = _mm256_fmadd_ps(prod, _mm256_set1_ps(dw * xs[t * nb + b]), acc[t]);
        if constexpr (kInt4) offset[t] += mw * xsum[t * nb + b];
      }
    }
    for (int t = 0; t < T; ++t) w.y[(r0 + t) * w.n + n] = hsum(acc[t]) + offset[t];
  }
}

template <bool kInt4, bool kVnni>
void rows(const Problem& p, const Matrix& w, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < p.m; r += kTile) {
    switch (std::min<int64_t>(kTile, p.m - r)) {
      case 1: tile<kInt4, kVnni, 1>(p, w, r, n0, n1); break;
      case 2: tile<kInt4, kVnni, 2>(p, w, r, n0, n1); break;
      case 3: tile<kInt4, kVnni, 3>(p, w, r, n0, n1); break;
      case 4: tile<kInt4, kVnni, 4>(p, w, r, n0, n1); break;
      case 5: tile<kInt4, kVnni, 5>(p, w, r, n0, n1); break;
      case 6: tile<kInt4, kVnni, 6>(p, w, r, n0, n1); break;
      case 7: tile<kInt4, kVnni, 7>(p, w, r, n0, n1); break;
      default: tile<kInt4, kVnni, 8>(p, w, r, n0, n1); break;
    }
  }
}

// Chunk c of the output rows of all the matrices, on the path the call chose.
template <bool kInt4>
void chunk(const Problem& p, int64_t c) {
  int i = 0;
  while (c >= p.first_chunk[i + 1]) ++i;
  const int64_t n0 = (c - p.first_chunk[i]) * kChunk, n1 = std::min(p.w[i].n, n0 + kChunk);
  p.vnni ? rows<kInt4, true>(p, p.w[i], n0, n1) : rows<kInt4, false>(p, p.w[i], n0, n1);
}

// y_i = x @ W_i for each weight matrix W_i in `weights` (int8: q, d; int4: q, d, min), x quantized once.
template <bool kInt4>
ffi::Error matmul(ffi::ThreadPool pool, F32Matrix x, ffi::RemainingArgs weights, ffi::RemainingRets ys) {
  constexpr size_t kArgs = kInt4 ? 3 : 2;
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  if (k % kBlock) return ffi::Error::InvalidArgument("quantized matmul: K must be a multiple of 32");
  if (ys.size() < 1 || ys.size() > kMaxMatrices || weights.size() != kArgs * ys.size())
    return ffi::Error::InvalidArgument("quantized matmul: 1 to 4 weight matrices, each with one output");
  Problem p;
  static thread_local QuantizedRows xq;  // read by helpers holding a chunk
  p.x = &xq, p.vnni = hire::use_vnni, p.m = m, p.k = k, p.count = static_cast<int>(ys.size());
  for (int i = 0; i < p.count; ++i) {
    auto q = weights.get<std::conditional_t<kInt4, U8Matrix, S8Matrix>>(kArgs * i);
    auto d = weights.get<F16Matrix>(kArgs * i + 1);
    auto y = ys.get<F32Matrix>(i);
    if (!q || !d || !y) return ffi::Error::InvalidArgument("quantized matmul: bad weight or output buffer");
    const int64_t n = (*y)->dimensions()[1];
    if (d->dimensions()[0] != n || d->dimensions()[1] != k / kBlock || (*y)->dimensions()[0] != m)
      return ffi::Error::InvalidArgument("quantized matmul: scales must be [N, K/32] and outputs [M, N]");
    const uint16_t* min = nullptr;
    if constexpr (kInt4) {
      auto mins = weights.get<F16Matrix>(kArgs * i + 2);
      if (!mins) return ffi::Error::InvalidArgument("quantized matmul: bad int4 mins");
      min = reinterpret_cast<const uint16_t*>(mins->typed_data());
    }
    p.w[i] = {reinterpret_cast<const uint8_t*>(q->typed_data()), reinterpret_cast<const uint16_t*>(d->typed_data()), min,
              (*y)->typed_data(), n};
    p.first_chunk[i + 1] = p.first_chunk[i] + (n + kChunk - 1) / kChunk;
  }
  quantize_rows(x.typed_data(), m, k, xq);
  if (p.vnni && !kInt4)
    for (int8_t& v : xq.q) v = static_cast<int8_t>(v ^ 0x80);
  hire::share_chunks(pool, p.first_chunk[p.count], [&p](int64_t c) { chunk<kInt4>(p, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HireMatmulInt8, matmul<false>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Matrix>().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HireMatmulInt4, matmul<true>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Matrix>().RemainingArgs().RemainingRets());

// The Python module hire._qmatmul: the two handlers as capsules for jax.ffi.register_ffi_target, `supported`,
// whether this CPU has the instructions the kernels were compiled for, `abi`, the handlers' calling convention
// (2: any number of weight matrices per call), which hire.kernels checks against a stale build, and vnni()
// (hire/csrc/kernels.h).
static PyModuleDef qmatmul_module = {PyModuleDef_HEAD_INIT, "_qmatmul", "hire's quantized matmul kernels", -1,
                                     hire::methods};

PyMODINIT_FUNC PyInit__qmatmul() {
  PyObject* module = PyModule_Create(&qmatmul_module);
  if (module == nullptr) return nullptr;
  hire::init_vnni();
  const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (PyModule_AddObject(module, "int8", PyCapsule_New(reinterpret_cast<void*>(HireMatmulInt8), nullptr, nullptr)) ||
      PyModule_AddObject(module, "int4", PyCapsule_New(reinterpret_cast<void*>(HireMatmulInt4), nullptr, nullptr)) ||
      PyModule_AddObject(module, "supported", PyBool_FromLong(supported)) ||
      PyModule_AddIntConstant(module, "abi", 2)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
