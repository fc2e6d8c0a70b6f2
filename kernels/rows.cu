// Indexed row moves between a sequence (B, T, D) and dense rows (B, R, D):
// the interleave (add R rows into their slot rows), the gather (read rows
// at positions), which is also the interleave's backward, and the scatter-add
// (the gather's backward), whose positions may repeat.
//
// One block per (b, j) row and width chunk. A row moves through 16-byte
// vector accesses when every pointer involved shares the same alignment
// modulo 16 bytes and is unit-strided along D; the few elements before the
// first aligned one and after the last full vector go scalar, so any width
// and any offset works, and non-unit strides fall back to scalar entirely.
#include "lmeye_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // vectors each thread keeps in flight before storing

template <typename T>
struct Math {
  using Acc = float;
  static __device__ __forceinline__ float up(T x) { return static_cast<float>(x); }
  static __device__ __forceinline__ T down(float x) { return static_cast<T>(x); }
};
template <>
struct Math<double> {
  using Acc = double;
  static __device__ __forceinline__ double up(double x) { return x; }
  static __device__ __forceinline__ double down(double x) { return x; }
};
template <>
struct Math<__half> {
  using Acc = float;
  static __device__ __forceinline__ float up(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half down(float x) { return __float2half_rn(x); }
};
template <>
struct Math<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float up(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 down(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename I>
__device__ __forceinline__ int64_t load_index(const void* base, int64_t offset) {
  return static_cast<int64_t>(static_cast<const I*>(base)[offset]);
}

__device__ __forceinline__ unsigned misalignment(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Elements [lo, hi) of a row split into a scalar head [lo, vlo), whole
// vectors [vlo, vhi) and a scalar tail [vhi, hi). `first` is the first element
// whose address is 16-byte aligned; no vectors when `vec` is false.
struct Span {
  int64_t vlo, vhi;
};

template <int V>
__device__ __forceinline__ Span split(int64_t lo, int64_t hi, bool vec, int64_t first) {
  Span s{hi, hi};
  if (vec) {
    const int64_t a = lo > first ? first + (lo - first + V - 1) / V * V : first;
    const int64_t z = hi > first ? first + (hi - first) / V * V : first;
    if (a < z) {
      s.vlo = a;
      s.vhi = z;
    }
  }
  return s;
}

enum class Move { kAdd, kScatterAdd, kGather };

template <typename I>
__device__ __forceinline__ int64_t position(const lmeye_rows_args& a, int64_t b, int64_t j) {
  return load_index<I>(a.index, b * a.index_stride[0] + j * a.index_stride[1]);
}

// The rows j..R-1 of entry b that share position pos, summed in Acc into the
// sequence row, for elements [lo, hi). Scalar: repeated positions are rare.
template <typename T, typename I>
__device__ void add_repeated(const lmeye_rows_args& a, int64_t b, int64_t j, int64_t pos, int64_t lo, int64_t hi) {
  using M = Math<T>;
  using Acc = typename M::Acc;
  T* dst = static_cast<T*>(a.seq) + b * a.seq_stride[0] + pos * a.seq_stride[1];
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    Acc x = M::up(dst[i * a.seq_stride[2]]);
    for (int64_t k = j; k < a.count; ++k) {
      if (position<I>(a, b, k) != pos) continue;
      x += M::up(static_cast<const T*>(a.rows)[b * a.rows_stride[0] + k * a.rows_stride[1] + i * a.rows_stride[2]]);
      if (a.slot_embed) x += M::up(static_cast<const T*>(a.slot_embed)[k * a.slot_stride[0] + i * a.slot_stride[1]]);
    }
    dst[i * a.seq_stride[2]] = M::down(x);
  }
}

template <typename T, typename I, bool kMergeRepeats>
__global__ void __launch_bounds__(kThreads) interleave_add_kernel(lmeye_rows_args a) {
  using M = Math<T>;
  using Acc = typename M::Acc;
  constexpr int V = Pack<T>::kSize;
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.count;
  const int64_t j = row - b * a.count;
  const int64_t pos = position<I>(a, b, j);
  if (pos < 0 || pos >= a.length) return;  // never write outside the sequence

  const int64_t chunk = static_cast<int64_t>(kThreads) * V * kUnroll;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = lo + chunk < a.width ? lo + chunk : a.width;
  if (kMergeRepeats) {
    // The first row at a position adds every row that shares it; the others
    // leave, so no two blocks write one sequence row.
    bool repeated = false;
    for (int64_t k = 0; k < a.count; ++k) {
      if (k == j || position<I>(a, b, k) != pos) continue;
      if (k < j) return;
      repeated = true;
    }
    if (repeated) {
      add_repeated<T, I>(a, b, j, pos, lo, hi);
      return;
    }
  }

  T* dst = static_cast<T*>(a.seq) + b * a.seq_stride[0] + pos * a.seq_stride[1];
  const T* src = static_cast<const T*>(a.rows) + b * a.rows_stride[0] + j * a.rows_stride[1];
  const T* emb = a.slot_embed ? static_cast<const T*>(a.slot_embed) + j * a.slot_stride[0] : nullptr;
  const int64_t ds = a.seq_stride[2], rs = a.rows_stride[2], es = a.slot_stride[1];
  const unsigned mis = misalignment(dst);
  const bool vec = ds == 1 && rs == 1 && mis % sizeof(T) == 0 && misalignment(src) == mis &&
                   (emb == nullptr || (es == 1 && misalignment(emb) == mis));
  const Span s = split<V>(lo, hi, vec, static_cast<int64_t>((16u - mis) % 16u / sizeof(T)));

  // The transmitted row and its slot embedding are summed first, then added
  // to the sequence row, all in Acc, with one rounding at the store.
  auto scalar = [&](int64_t i) {
    Acc x = M::up(src[i * rs]);
    if (emb) x += M::up(emb[i * es]);
    dst[i * ds] = M::down(M::up(dst[i * ds]) + x);
  };
  for (int64_t i = lo + threadIdx.x; i < s.vlo; i += kThreads) scalar(i);
  for (int64_t i = s.vhi + threadIdx.x; i < hi; i += kThreads) scalar(i);

  const int64_t step = static_cast<int64_t>(kThreads) * V;
  for (int64_t base = s.vlo + static_cast<int64_t>(threadIdx.x) * V; base < s.vhi; base += step * kUnroll) {
    Pack<T> d[kUnroll], r[kUnroll], e[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < s.vhi) {
        d[u] = *reinterpret_cast<const Pack<T>*>(dst + i);
        r[u] = *reinterpret_cast<const Pack<T>*>(src + i);
        if (emb) e[u] = *reinterpret_cast<const Pack<T>*>(emb + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < s.vhi) {
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          Acc x = M::up(r[u].v[k]);
          if (emb) x += M::up(e[u].v[k]);
          out.v[k] = M::down(M::up(d[u].v[k]) + x);
        }
        *reinterpret_cast<Pack<T>*>(dst + i) = out;
      }
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(lmeye_rows_args a) {
  using M = Math<T>;
  constexpr int V = Pack<T>::kSize;
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.count;
  const int64_t j = row - b * a.count;
  const int64_t pos = position<I>(a, b, j);
  const bool inside = pos >= 0 && pos < a.length;

  T* dst = static_cast<T*>(a.rows) + b * a.rows_stride[0] + j * a.rows_stride[1];
  const T* src = inside ? static_cast<const T*>(a.seq) + b * a.seq_stride[0] + pos * a.seq_stride[1] : nullptr;
  const int64_t ds = a.rows_stride[2], ss = a.seq_stride[2];

  const int64_t chunk = static_cast<int64_t>(kThreads) * V * kUnroll;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = lo + chunk < a.width ? lo + chunk : a.width;
  const unsigned mis = misalignment(dst);
  const bool vec = ds == 1 && mis % sizeof(T) == 0 && (src == nullptr || (ss == 1 && misalignment(src) == mis));
  const Span s = split<V>(lo, hi, vec, static_cast<int64_t>((16u - mis) % 16u / sizeof(T)));

  const T zero = M::down(0);
  for (int64_t i = lo + threadIdx.x; i < s.vlo; i += kThreads) dst[i * ds] = src ? src[i * ss] : zero;
  for (int64_t i = s.vhi + threadIdx.x; i < hi; i += kThreads) dst[i * ds] = src ? src[i * ss] : zero;

  Pack<T> zeros;
#pragma unroll
  for (int k = 0; k < V; ++k) zeros.v[k] = zero;
  const int64_t step = static_cast<int64_t>(kThreads) * V;
  for (int64_t base = s.vlo + static_cast<int64_t>(threadIdx.x) * V; base < s.vhi; base += step * kUnroll) {
    Pack<T> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      x[u] = (src && i < s.vhi) ? *reinterpret_cast<const Pack<T>*>(src + i) : zeros;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < s.vhi) *reinterpret_cast<Pack<T>*>(dst + i) = x[u];
    }
  }
}

template <typename T>
constexpr int64_t chunk_of() {
  return static_cast<int64_t>(kThreads) * Pack<T>::kSize * kUnroll;
}

template <Move kMove, typename T, typename I>
cudaError_t launch(const lmeye_rows_args& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.count;
  const int64_t chunks = (a.width + chunk_of<T>() - 1) / chunk_of<T>();
  if (rows == 0 || chunks == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  switch (kMove) {
    case Move::kAdd: interleave_add_kernel<T, I, false><<<grid, kThreads, 0, stream>>>(a); break;
    case Move::kScatterAdd: interleave_add_kernel<T, I, true><<<grid, kThreads, 0, stream>>>(a); break;
    case Move::kGather: gather_rows_kernel<T, I><<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <Move kMove, typename T>
cudaError_t launch_index(const lmeye_rows_args& a, cudaStream_t stream) {
  switch (a.index_dtype) {
    case LMEYE_INT32: return launch<kMove, T, int32_t>(a, stream);
    case LMEYE_INT64: return launch<kMove, T, int64_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <Move kMove>
cudaError_t dispatch(const lmeye_rows_args* a, cudaStream_t stream) {
  if (a == nullptr || a->batch < 0 || a->count < 0 || a->length < 0 || a->width < 0) return cudaErrorInvalidValue;
  switch (a->dtype) {
    case LMEYE_FLOAT32: return launch_index<kMove, float>(*a, stream);
    case LMEYE_FLOAT16: return launch_index<kMove, __half>(*a, stream);
    case LMEYE_BFLOAT16: return launch_index<kMove, __nv_bfloat16>(*a, stream);
    case LMEYE_FLOAT64: return launch_index<kMove, double>(*a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" cudaError_t lmeye_interleave_add(const lmeye_rows_args* args, cudaStream_t stream) {
  return dispatch<Move::kAdd>(args, stream);
}

extern "C" cudaError_t lmeye_scatter_add(const lmeye_rows_args* args, cudaStream_t stream) {
  return dispatch<Move::kScatterAdd>(args, stream);
}

extern "C" cudaError_t lmeye_gather_rows(const lmeye_rows_args* args, cudaStream_t stream) {
  return dispatch<Move::kGather>(args, stream);
}
