// Slot planner: request position, slot positions and a status per row of
// input_ids, computed on the device so that building the interleave indices
// never waits for the host.
//
// One block per row walks the row in tiles of blockDim tokens. Slot tokens get
// their rank (how many slot tokens precede them) from a warp ballot plus a
// block scan of the warp counts, so each of the first R writes its own
// position without atomics; the request token, rare, uses shared atomics.
#include "lmeye_kernels.h"

namespace {

constexpr int kMaxThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename I>
__global__ void __launch_bounds__(kMaxThreads) plan_slots_kernel(lmeye_plan_args a) {
  __shared__ int warp_count[kMaxThreads / 32];
  __shared__ int warp_offset[kMaxThreads / 32];
  __shared__ int tile_total;
  __shared__ unsigned long long first_request;
  __shared__ unsigned long long requests;
  __shared__ long long first_slot;
  __shared__ int32_t row_status;

  const int64_t b = blockIdx.x;
  const I* ids = static_cast<const I*>(a.input_ids) + b * a.ids_stride[0];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps = blockDim.x >> 5;
  if (tid == 0) {
    first_request = static_cast<unsigned long long>(a.length);
    requests = 0;
    first_slot = a.length;
  }
  __syncthreads();

  int64_t seen = 0;  // slot tokens in the tiles before this one
  for (int64_t base = 0; base < a.length; base += blockDim.x) {
    const int64_t t = base + tid;
    bool is_slot = false;
    if (t < a.length) {
      const int64_t id = static_cast<int64_t>(ids[t * a.ids_stride[1]]);
      is_slot = id == a.slot_token_id;
      if (id == a.request_token_id) {
        atomicMin(&first_request, static_cast<unsigned long long>(t));
        atomicAdd(&requests, 1ull);
      }
    }
    const unsigned ballot = __ballot_sync(kFullMask, is_slot);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int count = lane < warps ? warp_count[lane] : 0;
      int inclusive = count;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      if (lane < warps) warp_offset[lane] = inclusive - count;
      if (lane == 31) tile_total = inclusive;
    }
    __syncthreads();
    if (is_slot) {
      const int64_t rank = seen + warp_offset[warp] + __popc(ballot & ((1u << lane) - 1u));
      if (rank == 0) first_slot = t;
      if (rank < a.num_slots) a.slot_pos[b * a.num_slots + rank] = t;
    }
    seen += tile_total;
    // Two barriers per tile suffice: warp_count is rewritten only after this
    // tile's second barrier, warp_offset and tile_total only after the next
    // tile's first one, by which time every thread has read them.
  }
  __syncthreads();

  if (tid == 0) {
    const unsigned long long n_requests = requests;
    const int64_t request = n_requests ? static_cast<int64_t>(first_request) : 0;
    int32_t status = LMEYE_PLAN_OK;
    if (n_requests == 0) {
      status = LMEYE_PLAN_MISSING_REQUEST;
    } else if (n_requests > 1) {
      status = LMEYE_PLAN_MULTIPLE_REQUESTS;
    } else if (seen < a.num_slots) {
      status = LMEYE_PLAN_TOO_FEW_SLOTS;
    } else if (seen > a.num_slots) {
      status = LMEYE_PLAN_TOO_MANY_SLOTS;
    } else if (seen > 0 && first_slot < request) {
      status = LMEYE_PLAN_SLOT_BEFORE_REQUEST;
    }
    a.request_pos[b] = request;
    a.status[b] = status;
    row_status = status;
  }
  __syncthreads();
  // A malformed row gets no slot at all: with too few slot tokens its missing
  // slots would otherwise repeat a position, and repeated writes race.
  if (row_status != LMEYE_PLAN_OK) {
    for (int64_t k = tid; k < a.num_slots; k += blockDim.x) a.slot_pos[b * a.num_slots + k] = -1;
  }
}

template <typename I>
cudaError_t launch(const lmeye_plan_args& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.batch > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  // Whole warps only: the ballot and the scan need every lane of every warp.
  int64_t threads = (a.length + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  plan_slots_kernel<I><<<static_cast<unsigned>(a.batch), static_cast<unsigned>(threads), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t lmeye_plan_slots(const lmeye_plan_args* args, cudaStream_t stream) {
  if (args == nullptr || args->batch < 0 || args->length < 0 || args->num_slots < 0) return cudaErrorInvalidValue;
  switch (args->ids_dtype) {
    case LMEYE_INT32: return launch<int32_t>(*args, stream);
    case LMEYE_INT64: return launch<int64_t>(*args, stream);
  }
  return cudaErrorInvalidValue;
}
