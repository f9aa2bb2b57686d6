// Argument parsing and validation of the quant ops, shared by csrc/cpu/quant.cpp and csrc/cuda/quant.cu so both
// backends accept and reject exactly the same input with the same messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "pyperf/checks.h"
#include "pyperf/quant_math.h"

namespace pyperf {
namespace quant {

// The geometry of one chunk's wire: [nblocks fp32 scales][payload].
struct WireLayout {
  Format fmt;
  int64_t block_size;
  int64_t numel;
  int64_t nblocks;
  int64_t payload_offset;  // = 4 * nblocks
  int64_t bytes;           // whole wire
};

inline Format parse_format(c10::string_view fmt) {
  if (fmt == "int8") return kInt8;
  if (fmt == "int4") return kInt4;
  if (fmt == "fp8_e4m3") return kE4M3;
  if (fmt == "fp8_e5m2") return kE5M2;
  TORCH_CHECK_VALUE(false, "fmt: expected one of int8, int4, fp8_e4m3, fp8_e5m2, got '", std::string(fmt), "'");
}

inline WireLayout wire_layout(int64_t numel, c10::string_view fmt, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= kMinBlock && block_size <= kMaxBlock && (block_size & (block_size - 1)) == 0,
                    "block_size: expected a power of two in [", kMinBlock, ", ", kMaxBlock, "], got ", block_size);
  TORCH_CHECK_VALUE(numel >= 0, "numel: expected >= 0, got ", numel);
  WireLayout w;
  w.fmt = parse_format(fmt);
  w.block_size = block_size;
  w.numel = numel;
  w.nblocks = (numel + block_size - 1) / block_size;
  w.payload_offset = 4 * w.nblocks;
  w.bytes = w.payload_offset + w.nblocks * payload_bytes_per_block(w.fmt, block_size);
  return w;
}

// Scales are read and written as fp32, so a wire (possibly a slice of a larger buffer) must be 4-byte aligned;
// every wire is a multiple of 4 bytes, so consecutive chunks of an aligned buffer all are.
inline void check_wire(const at::Tensor& wire, const WireLayout& w, const char* name) {
  TORCH_CHECK(wire.scalar_type() == at::kByte, name, ": expected a uint8 wire, got dtype ", wire.scalar_type());
  check_contiguous(wire, name);
  TORCH_CHECK(wire.numel() == w.bytes, name, ": expected wire_bytes(", w.numel, ", fmt, ", w.block_size, ") = ",
              w.bytes, " bytes, got ", wire.numel());
  TORCH_CHECK(w.bytes == 0 || reinterpret_cast<uintptr_t>(wire.data_ptr()) % 4 == 0, name,
              ": expected a 4-byte aligned wire (its fp32 scales), got a slice at an unaligned address");
}

// One error-feedback tensor (`name`: residual or residual_out): fp32, numel values, contiguous, on ref's device.
inline void check_residual(const at::Tensor& r, int64_t numel, const at::Tensor& ref, const char* name,
                           const char* ref_name) {
  TORCH_CHECK(r.scalar_type() == at::kFloat, name, ": expected a float32 tensor, got dtype ", r.scalar_type());
  TORCH_CHECK(r.numel() == numel, name, ": expected ", numel, " elements, got ", r.numel());
  check_contiguous(r, name);
  check_same_device(r, ref, name, ref_name);
}

// Error feedback reads the old residual from `residual` (None: zeros) and writes the new one to `residual_out`,
// or back into `residual` when residual_out is None (in place). residual_out may be residual itself (the same
// memory: in place again) or memory apart from it; a partial overlap would read values already overwritten.
inline void check_residuals(const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& residual_out,
                            int64_t numel, const at::Tensor& ref, const char* ref_name) {
  if (residual.has_value()) check_residual(*residual, numel, ref, "residual", ref_name);
  if (!residual_out.has_value()) return;
  check_residual(*residual_out, numel, ref, "residual_out", ref_name);
  if (residual.has_value()) {
    // Both are contiguous with numel values, so they are byte ranges (of any shape, even of separate storages).
    const uintptr_t a = reinterpret_cast<uintptr_t>(residual->data_ptr());
    const uintptr_t b = reinterpret_cast<uintptr_t>(residual_out->data_ptr());
    const uintptr_t bytes = static_cast<uintptr_t>(numel) * sizeof(float);
    TORCH_CHECK(a == b || a + bytes <= b || b + bytes <= a,
                "residual_out: expected residual itself (in place) or memory that does not overlap residual, got "
                "a partial overlap");
  }
}

// Where the kernels read the old residual (null: zeros) and write the new one (null: no error feedback).
struct ResidualPtrs {
  const float* in;
  float* out;
};

inline ResidualPtrs residual_ptrs(const c10::optional<at::Tensor>& residual,
                                  const c10::optional<at::Tensor>& residual_out) {
  float* in = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  return {in, residual_out.has_value() ? residual_out->data_ptr<float>() : in};
}

// A wire the kernel writes (`out=`): see check_wire, plus on ref's device.
inline void check_out_wire(const at::Tensor& out, const WireLayout& w, const at::Tensor& ref, const char* ref_name) {
  check_wire(out, w, "out");
  check_same_device(out, ref, "out", ref_name);
}

// The argument checks of quantize_into, the same on CPU and CUDA. Return the wire layout.
inline WireLayout check_quantize_args(const at::Tensor& x, c10::string_view fmt, int64_t block_size,
                                      const c10::optional<at::Tensor>& residual,
                                      const c10::optional<at::Tensor>& residual_out, const at::Tensor& out) {
  check_float_dtype(x, "x");
  check_contiguous(x, "x");
  const WireLayout w = wire_layout(x.numel(), fmt, block_size);
  check_residuals(residual, residual_out, w.numel, x, "x");
  check_out_wire(out, w, x, "x");
  return w;
}

inline WireLayout check_dequantize_args(const at::Tensor& wire, int64_t numel, c10::string_view fmt,
                                        int64_t block_size, const at::Tensor& out) {
  const WireLayout w = wire_layout(numel, fmt, block_size);
  check_wire(wire, w, "wire");
  check_float_dtype(out, "out");
  check_contiguous(out, "out");
  check_same_device(out, wire, "out", "wire");
  TORCH_CHECK(out.numel() == numel, "out: expected ", numel, " elements (numel), got ", out.numel());
  return w;
}

// The [W, wire_bytes] uint8 stack of chunks that the reduce step reads (one chunk per rank).
inline WireLayout check_wires(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                              bool spaced_rows = false) {
  const WireLayout w = wire_layout(numel, fmt, block_size);
  TORCH_CHECK(wires.scalar_type() == at::kByte, "wires: expected uint8, got dtype ", wires.scalar_type());
  TORCH_CHECK(wires.dim() == 2 && wires.size(1) == w.bytes, "wires: expected shape [W, wire_bytes(", numel,
              ", fmt, ", block_size, ") = ", w.bytes, "] (one chunk per rank), got ", wires.sizes());
  if (!spaced_rows) {
    check_contiguous(wires, "wires");
    TORCH_CHECK(wires.numel() == 0 || reinterpret_cast<uintptr_t>(wires.data_ptr()) % 4 == 0,
                "wires: expected a 4-byte aligned buffer (fp32 scales), got an unaligned slice");
    return w;
  }
  // rows may lie further apart than wire_bytes (a column slice of a larger buffer), each 4-byte aligned
  TORCH_CHECK(wires.numel() == 0 || (wires.stride(1) == 1 && (wires.size(0) <= 1 || wires.stride(0) >= w.bytes)),
              "wires: expected rows of contiguous bytes that do not overlap, got strides ", wires.strides());
  TORCH_CHECK(wires.numel() == 0 || (reinterpret_cast<uintptr_t>(wires.data_ptr()) % 4 == 0 &&
                                     (wires.size(0) <= 1 || wires.stride(0) % 4 == 0)),
              "wires: expected 4-byte aligned rows (fp32 scales), got an unaligned slice or row stride ",
              wires.size(0) > 1 ? wires.stride(0) : 0);
  return w;
}

// The argument checks of reduce_requantize(_into). out (null for reduce_requantize, which allocates it) must not
// overlap wires: a block's scale is read again after it is written when the CUDA kernel re-reads a large block.
inline WireLayout check_requantize_args(const at::Tensor& wires, int64_t numel, c10::string_view fmt,
                                        int64_t block_size, const c10::optional<at::Tensor>& residual,
                                        const c10::optional<at::Tensor>& residual_out, const at::Tensor* out) {
  const WireLayout w = check_wires(wires, numel, fmt, block_size);
  check_residuals(residual, residual_out, numel, wires, "wires");
  if (out != nullptr) {
    check_out_wire(*out, w, wires, "wires");
    const uintptr_t o = reinterpret_cast<uintptr_t>(out->data_ptr());
    const uintptr_t in = reinterpret_cast<uintptr_t>(wires.data_ptr());
    const uintptr_t in_bytes = static_cast<uintptr_t>(wires.numel());
    TORCH_CHECK(w.bytes == 0 || in_bytes == 0 || o + static_cast<uintptr_t>(w.bytes) <= in || in + in_bytes <= o,
                "out: expected memory apart from wires, got a buffer that overlaps wires");
  }
  return w;
}

// The padded layout of quantize_tensors_into / dequantize_tensors_ (the layout of pack(xs, align=block_size)):
// tensor i covers blocks [bstart[i], bstart[i + 1]), its values first, then zeros up to the block boundary.
struct TensorsLayout {
  std::vector<int64_t> bstart;  // size(xs) + 1 entries
  WireLayout w;                 // of the whole padded layout
};

// Where each tensor's blocks start: tensor i covers blocks [bstart[i], bstart[i + 1]).
inline std::vector<int64_t> block_starts(at::TensorList xs, int64_t block_size) {
  std::vector<int64_t> bstart;
  bstart.reserve(xs.size() + 1);
  int64_t b = 0;
  for (const auto& x : xs) {
    bstart.push_back(b);
    b += (x.numel() + block_size - 1) / block_size;
  }
  bstart.push_back(b);
  return bstart;
}

// xs: one float dtype, contiguous, on wire's device. The wire (`wire_name`, read or written) must hold exactly the
// padded layout.
inline TensorsLayout check_tensors_layout(at::TensorList xs, const char* name, c10::string_view fmt,
                                          int64_t block_size, const at::Tensor& wire, const char* wire_name) {
  wire_layout(0, fmt, block_size);  // block_size and fmt first: the block count divides by block_size
  check_tensor_list(xs, name, &wire);
  if (!xs.empty()) check_float_dtype(xs[0], name);
  TensorsLayout l;
  l.bstart = block_starts(xs, block_size);
  l.w = wire_layout(l.bstart.back() * block_size, fmt, block_size);
  check_wire(wire, l.w, wire_name);
  return l;
}

// reduce_quantized_tensors_: the [W, wire_bytes] stack holds one wire of the padded layout of outs per rank. Its
// rows may be spaced further apart than wire_bytes (a column slice of a larger gather buffer whose rows carry more
// after the wire), with rows 4-byte aligned.
inline TensorsLayout check_tensors_wires(at::TensorList outs, c10::string_view fmt, int64_t block_size,
                                         const at::Tensor& wires) {
  wire_layout(0, fmt, block_size);
  check_tensor_list(outs, "outs", &wires);
  if (!outs.empty()) check_float_dtype(outs[0], "outs");
  TensorsLayout l;
  l.bstart = block_starts(outs, block_size);
  l.w = check_wires(wires, l.bstart.back() * block_size, fmt, block_size, /*spaced_rows=*/true);
  return l;
}

// reduce_quantized_tensors_'s own row: `own` (the caller's exact values, outs' layout) replaces wire own_row in
// the sum; both or neither.
inline void check_own_row(const c10::optional<at::TensorList>& own, int64_t own_row, at::TensorList outs,
                          const at::Tensor& wires) {
  if (!own.has_value()) {
    TORCH_CHECK(own_row == -1, "own_row: expected -1 without own, got ", own_row);
    return;
  }
  const at::TensorList o = *own;
  TORCH_CHECK(own_row >= 0 && own_row < wires.size(0), "own_row: expected a row of wires in [0, ", wires.size(0),
              ") with own, got ", own_row);
  TORCH_CHECK(o.size() == outs.size(), "own: expected ", outs.size(), " tensors (one per tensor of outs), got ",
              o.size());
  check_tensor_list(o, "own", &wires);
  for (size_t i = 0; i < o.size(); ++i) {
    TORCH_CHECK(o[i].numel() == outs[i].numel(), "own[", i, "]: expected ", outs[i].numel(),
                " elements like outs[", i, "], got ", o[i].numel());
    TORCH_CHECK(o[i].scalar_type() == outs[i].scalar_type(), "own[", i, "]: expected dtype ",
                outs[i].scalar_type(), " like outs, got ", o[i].scalar_type());
  }
}

// The tensor that holds block b (blocks of empty tensors: none), by bisection of bstart.
inline int64_t tensor_of_block(const std::vector<int64_t>& bstart, int64_t b) {
  return static_cast<int64_t>(std::upper_bound(bstart.begin(), bstart.end(), b) - bstart.begin()) - 1;
}

// seed/offset arrive as int64 and are used as the uint64 with the same bits.
inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

}  // namespace quant
}  // namespace pyperf
