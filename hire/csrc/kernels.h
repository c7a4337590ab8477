// What hire's CPU kernels (qmatmul.cc, scores.cc) share: output chunks handed out among XLA's intra-op threads, and
// the run-time choice of the int8 product instruction (AVX2's maddubs + madd, or AVX-512 VNNI's vpdpbusd), so one
// build runs on any CPU with AVX2.
#pragma once

#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace hire {

// body(c) for every chunk c in [0, chunks), taken from a shared counter by the calling thread and by helpers scheduled
// on XLA's pool. The caller waits only for chunks in progress, so a helper that starts late (its pool busy) finds none
// left; body runs only while the caller waits, so it may refer to the caller's locals.
inline void share_chunks(xla::ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks;
    std::function<void(int64_t)> body;
  };
  auto shared = std::make_shared<Shared>();
  shared->chunks = chunks, shared->body = std::move(body);
  auto run = [](Shared& s) {
    for (int64_t c; (c = s.next.fetch_add(1)) < s.chunks;) {
      s.body(c);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, run] { run(*shared); });
  run(*shared);
  // spin briefly, then yield: on a busy machine the helper holding the last chunk may be waiting for this core
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
}

// vpdpbusd on 256-bit registers (AVX512_VNNI + AVX512VL, EVEX-encoded): acc's 8 int32 lanes plus, in each, the sum of
// the 4 products of a's unsigned bytes and b's signed bytes at that lane, exact (no 16-bit intermediate). Written as
// inline assembly so the callers stay compiled for AVX2 and the same template serves both paths; run only where
// use_vnni says the CPU has it.
inline __m256i dpbusd(__m256i acc, __m256i a, __m256i b) {
  asm("vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
  return acc;
}

inline bool cpu_has_vnni() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"); }

// Whether the kernels use vpdpbusd: where the CPU has it, unless HIRE_KERNELS=avx2 at import or vnni(False) since.
// Each call reads it once.
inline std::atomic<bool> use_vnni{false};

// The Python modules' `vnni([on])`: whether the kernels use vpdpbusd, after switching it on (where the CPU has it) or
// off when `on` is given.
inline PyObject* vnni(PyObject*, PyObject* args) {
  int on = -1;
  if (!PyArg_ParseTuple(args, "|p", &on)) return nullptr;
  if (on >= 0) use_vnni = on && cpu_has_vnni();
  return PyBool_FromLong(use_vnni);
}

inline PyMethodDef methods[] = {
    {"vnni", vnni, METH_VARARGS, "vnni([on]): whether the kernels use AVX-512 VNNI's vpdpbusd (on: switch first)"},
    {nullptr, nullptr, 0, nullptr}};

inline void init_vnni() {
  const char* isa = std::getenv("HIRE_KERNELS");
  use_vnni = cpu_has_vnni() && !(isa && std::strcmp(isa, "avx2") == 0);
}

}  // namespace hire
