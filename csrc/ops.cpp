// PyTorch bindings of the CUDA kernels in kernels/: operator schemas,
// argument checks and launches on the current stream of the tensors' device.
//
// Fake (meta) implementations and autograd live in lmeye_fast/ops/cuda.py,
// named below with set_python_module so that tracing finds them. The same
// functions are registered for CPU so that a CPU call fails with a message
// that says why, instead of the dispatcher's generic "no kernel" error.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "lmeye_kernels.h"

namespace {

// Messages use the words of lmeye_fast/checks.py ("name: expected ..., got ..."), after the op's name:
// dtypes as torch.float32 prints (float32), shapes as a Python tuple.
std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(type);
  }
}

std::string shape_of(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& first,
                const char* first_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor (the CUDA backend has no CPU kernels), got "
              "a tensor on ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, ": expected a tensor on ", first.device(), " (like ",
              first_name, "), got ", t.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, ": expected shape ", shape, ", got ", shape_of(t.sizes()));
}

lmeye_dtype float_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LMEYE_FLOAT32;
    case at::kHalf: return LMEYE_FLOAT16;
    case at::kBFloat16: return LMEYE_BFLOAT16;
    case at::kDouble: return LMEYE_FLOAT64;
    default:
      C10_THROW_ERROR(TypeError, c10::str(op, ": ", name, ": expected dtype in (float32, float16, bfloat16, float64), got ",
                                          dtype_name(t.scalar_type())));
  }
}

lmeye_index_dtype index_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kInt: return LMEYE_INT32;
    case at::kLong: return LMEYE_INT64;
    default: C10_THROW_ERROR(TypeError, c10::str(op, ": ", name, ": expected dtype in (int32, int64), got ",
                                                       dtype_name(t.scalar_type())));
  }
}

void same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected dtype ",
                   dtype_name(ref.scalar_type()), " (the dtype of ", ref_name, "), got ", dtype_name(t.scalar_type()));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The geometry both row kernels read: seq (B, T, D), rows (B, R, D), index (B, R).
// The data pointers are set by the caller, which knows which side is written.
void describe_rows(lmeye_rows_args& a, const at::Tensor& seq, const at::Tensor& rows, const at::Tensor& index) {
  a.batch = seq.size(0);
  a.count = index.size(1);
  a.length = seq.size(1);
  a.width = seq.size(2);
  a.index = index.const_data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.seq_stride[d] = seq.stride(d);
    a.rows_stride[d] = rows.stride(d);
  }
  a.index_stride[0] = index.stride(0);
  a.index_stride[1] = index.stride(1);
}

// Checks shared by everything that adds rows (B, R, D) into seq (B, T, D) at
// index (B, R), and the launch. `seq` may be written; the others are read.
// `kernel` is lmeye_interleave_add (distinct positions) or lmeye_scatter_add (repeats summed).
using rows_kernel = cudaError_t (*)(const lmeye_rows_args*, cudaStream_t);

void add_rows(const char* op, const at::Tensor& seq, const char* seq_name, const at::Tensor& rows,
              const at::Tensor& index, const char* index_name, const std::optional<at::Tensor>& slot_embed,
              rows_kernel kernel = lmeye_interleave_add) {
  check_cuda(op, seq_name, seq, seq, seq_name);
  check_cuda(op, "rows", rows, seq, seq_name);
  check_cuda(op, index_name, index, seq, seq_name);
  check_dim(op, seq_name, seq, 3, "(B, T, D)");
  check_dim(op, "rows", rows, 3, "(B, R, D)");
  check_dim(op, index_name, index, 2, "(B, R)");
  const int64_t batch = seq.size(0), count = rows.size(1), width = seq.size(2);
  TORCH_CHECK_VALUE(rows.size(0) == batch && rows.size(2) == width, op, ": rows: expected shape (B, R, D) = (", batch,
                    ", R, ", width, ") to match ", seq_name, " ", shape_of(seq.sizes()), ", got ", shape_of(rows.sizes()));
  TORCH_CHECK_VALUE(index.size(0) == batch && index.size(1) == count, op, ": ", index_name,
                    ": expected shape (B, R) = (", batch, ", ", count, "), got ", shape_of(index.sizes()));
  lmeye_rows_args a{};
  a.dtype = float_dtype(op, seq_name, seq);
  same_dtype(op, "rows", rows, seq, seq_name);
  a.index_dtype = index_dtype(op, index_name, index);
  if (slot_embed.has_value()) {
    const at::Tensor& e = *slot_embed;
    check_cuda(op, "slot_embed", e, seq, seq_name);
    check_dim(op, "slot_embed", e, 2, "(R, D)");
    TORCH_CHECK_VALUE(e.size(0) == count && e.size(1) == width, op, ": slot_embed: expected shape (R, D) = (",
                      count, ", ", width, "), got ", shape_of(e.sizes()));
    same_dtype(op, "slot_embed", e, seq, seq_name);
    a.slot_embed = e.const_data_ptr();
    a.slot_stride[0] = e.stride(0);
    a.slot_stride[1] = e.stride(1);
  }
  describe_rows(a, seq, rows, index);
  a.seq = seq.mutable_data_ptr();
  a.rows = const_cast<void*>(rows.const_data_ptr());
  const c10::cuda::CUDAGuard guard(seq.device());
  C10_CUDA_CHECK(kernel(&a, stream_of(seq)));
}

at::Tensor interleave(const at::Tensor& embeds, const at::Tensor& rows, const at::Tensor& slot_pos,
                      const std::optional<at::Tensor>& slot_embed) {
  check_cuda("lmeye_fast::interleave", "embeds", embeds, embeds, "embeds");
  at::Tensor out = embeds.clone();
  add_rows("lmeye_fast::interleave", out, "embeds", rows, slot_pos, "slot_pos", slot_embed);
  return out;
}

void interleave_(const at::Tensor& embeds, const at::Tensor& rows, const at::Tensor& slot_pos,
                 const std::optional<at::Tensor>& slot_embed) {
  const char* op = "lmeye_fast::interleave_";
  check_cuda(op, "embeds", embeds, embeds, "embeds");
  TORCH_CHECK(at::has_internal_overlap(embeds) != at::MemOverlap::Yes, op,
              ": embeds: has elements that share memory (an expanded tensor, strides ", shape_of(embeds.strides()),
              "); the in-place interleave needs distinct rows: pass embeds.contiguous() or use inplace=False");
  const auto check_apart = [&](const char* name, const at::Tensor& t) {
    const auto overlap = at::get_overlap_status(embeds, t);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op, ": ", name,
                ": shares memory with embeds, which the in-place interleave writes; pass a copy (", name, ".clone())");
  };
  check_apart("rows", rows);
  if (slot_embed.has_value()) check_apart("slot_embed", *slot_embed);
  add_rows(op, embeds, "embeds", rows, slot_pos, "slot_pos", slot_embed);
}

// The in-place interleave bumps the version counter of embeds, as built-in
// in-place ops do, so that autograd notices when a tensor it saved for a
// backward was overwritten. Runs for every backend, meta and fake included.
void interleave_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& embeds, const at::Tensor& rows,
                                const at::Tensor& slot_pos, const std::optional<at::Tensor>& slot_embed) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lmeye_fast::interleave_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  op.redispatch(keys & c10::after_ADInplaceOrView_keyset, embeds, rows, slot_pos, slot_embed);
  embeds.unsafeGetTensorImpl()->bump_version();
}

at::Tensor gather_rows(const at::Tensor& seq, const at::Tensor& index) {
  const char* op = "lmeye_fast::gather_rows";
  check_cuda(op, "seq", seq, seq, "seq");
  check_cuda(op, "index", index, seq, "seq");
  check_dim(op, "seq", seq, 3, "(B, T, D)");
  check_dim(op, "index", index, 2, "(B, R)");
  TORCH_CHECK_VALUE(index.size(0) == seq.size(0), op, ": index: expected shape (B, R) with B = ",
                    seq.size(0), " to match seq ", shape_of(seq.sizes()), ", got ", shape_of(index.sizes()));
  lmeye_rows_args a{};
  a.dtype = float_dtype(op, "seq", seq);
  a.index_dtype = index_dtype(op, "index", index);
  at::Tensor out = at::empty({seq.size(0), index.size(1), seq.size(2)}, seq.options());
  describe_rows(a, seq, out, index);
  a.seq = const_cast<void*>(seq.const_data_ptr());
  a.rows = out.mutable_data_ptr();
  const c10::cuda::CUDAGuard guard(seq.device());
  C10_CUDA_CHECK(lmeye_gather_rows(&a, stream_of(seq)));
  return out;
}

at::Tensor scatter_rows(const at::Tensor& rows, const at::Tensor& index, int64_t length) {
  const char* op = "lmeye_fast::scatter_rows";
  check_cuda(op, "rows", rows, rows, "rows");
  check_dim(op, "rows", rows, 3, "(B, R, D)");
  TORCH_CHECK_VALUE(length >= 0, op, ": length: expected >= 0, got ", length);
  at::Tensor out = at::zeros({rows.size(0), length, rows.size(2)}, rows.options());
  // A gather may read one position several times, so its backward sums repeats.
  add_rows(op, out, "out", rows, index, "index", std::nullopt, lmeye_scatter_add);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_slots(const at::Tensor& input_ids, int64_t request_token_id,
                                                          int64_t slot_token_id, int64_t num_slots) {
  const char* op = "lmeye_fast::plan_slots";
  check_cuda(op, "input_ids", input_ids, input_ids, "input_ids");
  check_dim(op, "input_ids", input_ids, 2, "(B, T)");
  TORCH_CHECK_VALUE(num_slots >= 0, op, ": num_slots: expected >= 0, got ", num_slots);
  lmeye_plan_args a{};
  a.ids_dtype = index_dtype(op, "input_ids", input_ids);
  const int64_t batch = input_ids.size(0);
  const auto index_options = input_ids.options().dtype(at::kLong);
  at::Tensor request_pos = at::empty({batch}, index_options);
  at::Tensor slot_pos = at::empty({batch, num_slots}, index_options);
  at::Tensor status = at::empty({batch}, input_ids.options().dtype(at::kInt));
  a.batch = batch;
  a.length = input_ids.size(1);
  a.num_slots = num_slots;
  a.input_ids = input_ids.const_data_ptr();
  a.ids_stride[0] = input_ids.stride(0);
  a.ids_stride[1] = input_ids.stride(1);
  a.request_token_id = request_token_id;
  a.slot_token_id = slot_token_id;
  a.request_pos = request_pos.data_ptr<int64_t>();
  a.slot_pos = slot_pos.data_ptr<int64_t>();
  a.status = status.data_ptr<int32_t>();
  const c10::cuda::CUDAGuard guard(input_ids.device());
  C10_CUDA_CHECK(lmeye_plan_slots(&a, stream_of(input_ids)));
  return {request_pos, slot_pos, status};
}

}  // namespace

TORCH_LIBRARY(lmeye_fast, m) {
  m.set_python_module("lmeye_fast.ops.cuda");
  m.def("interleave(Tensor embeds, Tensor rows, Tensor slot_pos, Tensor? slot_embed=None) -> Tensor");
  m.def("interleave_(Tensor(a!) embeds, Tensor rows, Tensor slot_pos, Tensor? slot_embed=None) -> ()");
  m.def("gather_rows(Tensor seq, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor rows, Tensor index, SymInt length) -> Tensor");
  m.def("plan_slots(Tensor input_ids, int request_token_id, int slot_token_id, int num_slots) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmeye_fast, CUDA, m) {
  m.impl("interleave", &interleave);
  m.impl("interleave_", &interleave_);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("plan_slots", &plan_slots);
}

TORCH_LIBRARY_IMPL(lmeye_fast, ADInplaceOrView, m) {
  m.impl("interleave_", TORCH_FN(interleave_inplace_or_view));
}

TORCH_LIBRARY_IMPL(lmeye_fast, CPU, m) {
  m.impl("interleave", &interleave);
  m.impl("interleave_", &interleave_);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("plan_slots", &plan_slots);
}
