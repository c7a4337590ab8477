// HiRE-Q's score product as an XLA FFI handler for the CPU: dots = x @ q.T for int8 activation rows x [M, K] and an
// int8 predictor q [N, K] (hire/predictors.py), both in [-127, 127], exact in int32. XLA's own s8 x s8 -> s32
// product reads q at about half the float GEMV's bandwidth for the few rows a decode step has; here each weight row
// is read once for all M activation rows and the output rows are shared among XLA's intra-op threads. The products:
// AVX2, |q| times x with q's sign (maddubs + madd into int32 lanes); AVX-512 VNNI, x + 128 (unsigned) times q
// (vpdpbusd), less 128 times q's row sum, taken the same way.
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;
using S8Matrix = ffi::Buffer<ffi::S8, 2>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

namespace {

constexpr int64_t kBlock = 32;  // bytes of K per step
constexpr int kTile = 8;        // activation rows per pass over a weight row
constexpr int64_t kChunk = 64;  // weight rows per unit of work handed to a thread

struct Work {
  const int8_t *x, *q;  // x: plus 128 (as unsigned bytes) on the VNNI path
  int32_t* y;
  int64_t m, n, k;
};

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// y[r0 + t, n] for the `T` activation rows from r0 and weight rows [n0, n1).
template <bool kVnni, int T>
void tile(const Work& w, int64_t r0, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi8(-128);  // -128: 128 unsigned
  const int8_t* x = w.x + r0 * w.k;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w.q + n * w.k;
    __m256i acc[T], bias = _mm256_setzero_si256();  // bias: 128 times the row's sum, in 8 lanes
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < w.k; b += kBlock) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
      if constexpr (kVnni) bias = hire::dpbusd(bias, offset, qv);
      const __m256i qabs = _mm256_sign_epi8(qv, qv);  // maddubs takes an unsigned left operand
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * w.k + b));
        if constexpr (kVnni) {
          acc[t] = hire::dpbusd(acc[t], xv, qv);
        } else {
          const __m256i pairs = _mm256_maddubs_epi16(qabs, _mm256_sign_epi8(xv, qv));  // |127 * 127 * 2| < 2^15
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    const int32_t shift = kVnni ? hsum(bias) : 0;
    for (int t = 0; t < T; ++t) w.y[(r0 + t) * w.n + n] = hsum(acc[t]) - shift;
  }
}

template <bool kVnni>
void rows(const Work& w, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < w.m; r += kTile) {
    switch (std::min<int64_t>(kTile, w.m - r)) {
      case 1: tile<kVnni, 1>(w, r, n0, n1); break;
      case 2: tile<kVnni, 2>(w, r, n0, n1); break;
      case 3: tile<kVnni, 3>(w, r, n0, n1); break;
      case 4: tile<kVnni, 4>(w, r, n0, n1); break;
      case 5: tile<kVnni, 5>(w, r, n0, n1); break;
      case 6: tile<kVnni, 6>(w, r, n0, n1); break;
      case 7: tile<kVnni, 7>(w, r, n0, n1); break;
      default: tile<kVnni, 8>(w, r, n0, n1); break;
    }
  }
}

ffi::Error scores(ffi::ThreadPool pool, S8Matrix x, S8Matrix q, ffi::Result<S32Matrix> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = q.dimensions()[0];
  if (k % kBlock || q.dimensions()[1] != k) return ffi::Error::InvalidArgument("int8 scores: K must match, x 32");
  const bool vnni = hire::use_vnni;
  Work w{x.typed_data(), q.typed_data(), y->typed_data(), m, n, k};
  static thread_local std::vector<int8_t> shifted;  // x + 128 for the VNNI path (read by helpers holding a chunk)
  if (vnni) {
    shifted.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i) shifted[i] = static_cast<int8_t>(w.x[i] ^ 0x80);
    w.x = shifted.data();
  }
  hire::share_chunks(pool, (n + kChunk - 1) / kChunk, [&w, vnni](int64_t c) {
    const int64_t n0 = c * kChunk, n1 = std::min(w.n, n0 + kChunk);
    vnni ? rows<true>(w, n0, n1) : rows<false>(w, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HireScoresInt8, scores,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<S8Matrix>().Arg<S8Matrix>().Ret<S32Matrix>());

// The Python module hire._scores: the handler as a capsule for jax.ffi.register_ffi_target, `supported`, whether this
// CPU has AVX2, `abi`, the handler's calling convention (checked by hire.kernels), and vnni() (hire/csrc/kernels.h).
static PyModuleDef scores_module = {PyModuleDef_HEAD_INIT, "_scores", "HiRE-Q's int8 score product", -1, hire::methods};

PyMODINIT_FUNC PyInit__scores() {
  PyObject* module = PyModule_Create(&scores_module);
  if (module == nullptr) return nullptr;
  hire::init_vnni();
  if (PyModule_AddObject(module, "int8", PyCapsule_New(reinterpret_cast<void*>(HireScoresInt8), nullptr, nullptr)) ||
      PyModule_AddObject(module, "supported", PyBool_FromLong(__builtin_cpu_supports("avx2"))) ||
      PyModule_AddIntConstant(module, "abi", 1)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
