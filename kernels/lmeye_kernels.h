// C API of the lmeye_fast CUDA kernels: raw pointers, element strides, a stream.
//
// No framework headers: the PyTorch bindings in csrc/ and any other C/C++ code
// call these entry points the same way. Every entry point enqueues its work on
// `stream` and returns the launch status; none of them synchronises the host.
#ifndef LMEYE_KERNELS_H
#define LMEYE_KERNELS_H

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lmeye_dtype {
  LMEYE_FLOAT32 = 0,
  LMEYE_FLOAT16 = 1,
  LMEYE_BFLOAT16 = 2,
  LMEYE_FLOAT64 = 3
} lmeye_dtype;

typedef enum lmeye_index_dtype {
  LMEYE_INT32 = 0,
  LMEYE_INT64 = 1
} lmeye_index_dtype;

// Per-row outcome of lmeye_plan_slots. When a row has several problems the
// smallest non-zero code is reported. lmeye_fast/planner.py mirrors these values.
typedef enum lmeye_plan_status {
  LMEYE_PLAN_OK = 0,
  LMEYE_PLAN_MISSING_REQUEST = 1,      // no request token in the row
  LMEYE_PLAN_MULTIPLE_REQUESTS = 2,    // more than one request token
  LMEYE_PLAN_TOO_FEW_SLOTS = 3,        // fewer slot tokens than num_slots
  LMEYE_PLAN_TOO_MANY_SLOTS = 4,       // more slot tokens than num_slots
  LMEYE_PLAN_SLOT_BEFORE_REQUEST = 5   // a slot token precedes the request token
} lmeye_plan_status;

// Row moves between a sequence (B, T, D) and dense rows (B, R, D) through
// index (B, R); all strides are in elements, any sign-free layout works.
// `seq`, `rows` and `slot_embed` share one floating dtype.
typedef struct lmeye_rows_args {
  int64_t batch;   // B
  int64_t count;   // R, rows per batch entry
  int64_t length;  // T, sequence length
  int64_t width;   // D, row width
  void* seq;
  int64_t seq_stride[3];
  void* rows;
  int64_t rows_stride[3];
  const void* slot_embed;  // (R, D) or NULL
  int64_t slot_stride[2];
  const void* index;
  int64_t index_stride[2];
  lmeye_dtype dtype;
  lmeye_index_dtype index_dtype;
} lmeye_rows_args;

// seq[b, index[b, j]] += rows[b, j] (+ slot_embed[j]), summed in float32
// (float64 for float64) and rounded once. Rows whose index lies outside
// [0, T) are skipped, so nothing outside seq is ever written. Positions of
// one batch entry must be distinct (no atomics).
cudaError_t lmeye_interleave_add(const lmeye_rows_args* args, cudaStream_t stream);

// lmeye_interleave_add for positions that may repeat within a batch entry (the
// backward of a gather): the rows that share a position are summed, in order
// of j, by the first of them, so the result is exact and deterministic. Costs
// a scan of the entry's R positions per row.
cudaError_t lmeye_scatter_add(const lmeye_rows_args* args, cudaStream_t stream);

// rows[b, j] = seq[b, index[b, j]]; a row whose index lies outside [0, T) is
// filled with zeros. slot_embed is ignored.
cudaError_t lmeye_gather_rows(const lmeye_rows_args* args, cudaStream_t stream);

typedef struct lmeye_plan_args {
  int64_t batch;      // B
  int64_t length;     // T
  int64_t num_slots;  // R
  const void* input_ids;  // (B, T)
  int64_t ids_stride[2];
  lmeye_index_dtype ids_dtype;
  int64_t request_token_id;
  int64_t slot_token_id;
  int64_t* request_pos;  // (B,) contiguous
  int64_t* slot_pos;     // (B, R) contiguous
  int32_t* status;       // (B,) contiguous, lmeye_plan_status values
} lmeye_plan_args;

// Per row b: request_pos[b] = first request token (0 if none); slot_pos[b] =
// the first R slot tokens in order when the row is well formed, and -1 (a
// position every row kernel skips) throughout when it is not, so a malformed
// row is never written and never written twice; status[b] as above.
// One block per row, no host synchronisation.
cudaError_t lmeye_plan_slots(const lmeye_plan_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // LMEYE_KERNELS_H
