// HiRE-Q's score product as an XLA FFI handler for the CPU: dots = x @ q.T for int8 activation rows x [M, K] and an
// int8 predictor q [N, K] (hire/predictors.py), both in [-127, 127], exact in int32. XLA's own s8 x s8 -> s32
// product reads q at about half the float GEMV's bandwidth for the few rows a decode step has; here each weight row
// is read once for all M activation rows (AVX2: |q| times x with q's sign, maddubs + madd into int32 lanes) and the
// output rows are shared among XLA's intra-op threads.
#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using S8Matrix = ffi::Buffer<ffi::S8, 2>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

namespace {

constexpr int64_t kBlock = 32;  // bytes of K per AVX2 step
constexpr int kTile = 8;        // activation rows per pass over a weight row
constexpr int64_t kChunk = 64;  // weight rows per unit of work handed to a thread

struct Work {
  const int8_t *x, *q;
  int32_t* y;
  int64_t m, n, k;
  std::atomic<int64_t> next{0}, done{0};
};

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// y[r0 + t, n] for the `T` activation rows from r0 and weight rows [n0, n1).
template <int T>
void tile(const Work& w, int64_t r0, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x = w.x + r0 * w.k;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w.q + n * w.k;
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < w.k; b += kBlock) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
      const __m256i qabs = _mm256_sign_epi8(qv, qv);  // maddubs takes an unsigned left operand
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * w.k + b));
        const __m256i pairs = _mm256_maddubs_epi16(qabs, _mm256_sign_epi8(xv, qv));  // |127 * 127 * 2| < 2^15
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int t = 0; t < T; ++t) w.y[(r0 + t) * w.n + n] = hsum(acc[t]);
  }
}

void rows(const Work& w, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < w.m; r += kTile) {
    switch (std::min<int64_t>(kTile, w.m - r)) {
      case 1: tile<1>(w, r, n0, n1); break;
      case 2: tile<2>(w, r, n0, n1); break;
      case 3: tile<3>(w, r, n0, n1); break;
      case 4: tile<4>(w, r, n0, n1); break;
      case 5: tile<5>(w, r, n0, n1); break;
      case 6: tile<6>(w, r, n0, n1); break;
      case 7: tile<7>(w, r, n0, n1); break;
      default: tile<8>(w, r, n0, n1); break;
    }
  }
}

// Chunks taken from a shared counter by the caller and by helpers on XLA's pool; the caller waits only for chunks in
// progress, so a helper that starts late finds none left.
void run_chunks(Work& w) {
  const int64_t chunks = (w.n + kChunk - 1) / kChunk;
  for (int64_t c; (c = w.next.fetch_add(1)) < chunks;) {
    rows(w, c * kChunk, std::min(w.n, (c + 1) * kChunk));
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error scores(ffi::ThreadPool pool, S8Matrix x, S8Matrix q, ffi::Result<S32Matrix> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = q.dimensions()[0];
  if (k % kBlock || q.dimensions()[1] != k) return ffi::Error::InvalidArgument("int8 scores: K must match, x 32");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data(), work->q = q.typed_data(), work->y = y->typed_data();
  work->m = m, work->n = n, work->k = k;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { run_chunks(*work); });
  run_chunks(*work);
  // spin briefly, then yield: on a busy machine the helper holding the last chunk may be waiting for this core
  for (int spins = 0; work->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HireScoresInt8, scores,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<S8Matrix>().Arg<S8Matrix>().Ret<S32Matrix>());

// The Python module hire._scores: the handler as a capsule for jax.ffi.register_ffi_target and `supported`, whether
// this CPU has AVX2.
static PyModuleDef scores_module = {PyModuleDef_HEAD_INIT, "_scores", "HiRE-Q's int8 score product", -1};

PyMODINIT_FUNC PyInit__scores() {
  PyObject* module = PyModule_Create(&scores_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObject(module, "int8", PyCapsule_New(reinterpret_cast<void*>(HireScoresInt8), nullptr, nullptr)) ||
      PyModule_AddObject(module, "supported", PyBool_FromLong(__builtin_cpu_supports("avx2")))) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
