// The one TORCH_LIBRARY(pyperf, m) block: every op schema lives here. Kernels register in
// csrc/cpu/X.cpp (TORCH_LIBRARY_IMPL(pyperf, CPU, m)) and csrc/cuda/X.cu (TORCH_LIBRARY_IMPL(pyperf, CUDA, m));
// autograd in csrc/autograd/X.cpp (TORCH_LIBRARY_IMPL(pyperf, Autograd, m)); fakes in pyperf/ops.py. Keep the
// sections per feature, in the order of the files. The SIMT emulation's test-only extension (csrc/emu) compiles
// this file with PYPERF_CUDA_EMU: the same schemas as torch.ops.pyperf_emu, in module pyperf._C_emu.
#include <Python.h>

#include "pyperf/library.h"

#include "pyperf_build_config.h"

PYPERF_LIBRARY(m) {
  // ---- pack: fused bucket packing (csrc/cpu/pack.cpp, csrc/cuda/pack.cu) ----
  // Many same-dtype contiguous tensors <-> one flat 1-D buffer in one pass, with `scale` and the dtype cast
  // fused into the copy. Tensor i starts at a multiple of `align` elements; padding (and the tail up to
  // `total`, itself a multiple of align) is zero-filled. Layout: pyperf.ops.pack_layout.
  m.def("pack(Tensor[] tensors, float scale=1.0, ScalarType? out_dtype=None, int align=1) -> Tensor");
  // The same into a caller's buffer: writes out[0:total] and nothing beyond it.
  m.def("pack_out(Tensor[] tensors, float scale, int align, Tensor(a!) out) -> ()");
  // flat -> tensors in place: t = scale * flat[slice] (or t += scale * flat[slice] with accumulate).
  m.def("unpack(Tensor flat, Tensor(a!)[] tensors, float scale=1.0, int align=1, bool accumulate=False) -> ()");
  // (sum of squares of every element as a float32 0-dim tensor, bool 0-dim: any inf/nan in the inputs).
  m.def("multi_tensor_l2norm(Tensor[] tensors) -> (Tensor, Tensor)");

  // ---- quant: blockwise gradient quantization (csrc/cpu/quant.cpp, csrc/cuda/quant.cu) ----
  // Wire of one chunk: [nblocks fp32 scales][payload] in one uint8 buffer (docs/quant.md). fmt: int8 | int4 |
  // fp8_e4m3 | fp8_e5m2; block_size a power of two in [32, 4096]. seed/offset key Philox (their int64 bits are
  // read as uint64). Error feedback (fp32, numel like x): v = x + residual is quantized and the new residual
  // v - deQ(q) is written to residual_out, or in place into residual when residual_out is None; residual None with
  // a residual_out reads zeros. residual_out may be residual itself, or memory apart from it (no partial overlap).
  m.def("quantize(Tensor x, str fmt, int block_size, bool stochastic, int seed, int offset, Tensor(a!)? residual, "
        "Tensor(b!)? residual_out=None) -> Tensor");
  m.def("quantize_into(Tensor x, str fmt, int block_size, bool stochastic, int seed, int offset, "
        "Tensor(a!)? residual, Tensor(b!) out, Tensor(c!)? residual_out=None) -> ()");
  m.def("dequantize(Tensor wire, SymInt numel, str fmt, int block_size, ScalarType out_dtype, float scale)"
        " -> Tensor");
  m.def("dequantize_into(Tensor wire, SymInt numel, str fmt, int block_size, float scale, bool accumulate, "
        "Tensor(a!) out) -> ()");
  // wires: uint8 [W, wire_bytes(numel)], one chunk per rank; sums in fp32 in rank order 0..W-1.
  m.def("reduce_quantized(Tensor wires, SymInt numel, str fmt, int block_size, float scale, ScalarType out_dtype)"
        " -> Tensor");
  // The sum requantized into a wire, with server-side error feedback (residual / residual_out as in quantize).
  m.def("reduce_requantize(Tensor wires, SymInt numel, str fmt, int block_size, float scale, bool stochastic, "
        "int seed, int offset, Tensor(a!)? residual, Tensor(b!)? residual_out=None) -> Tensor");
  // The same into a caller's wire (e.g. a slice of a send buffer): out must not overlap wires.
  m.def("reduce_requantize_into(Tensor wires, SymInt numel, str fmt, int block_size, float scale, bool stochastic, "
        "int seed, int offset, Tensor(a!)? residual, Tensor(b!) out, Tensor(c!)? residual_out=None) -> ()");
  // Many tensors at once, without the packed fp32 copy: quantize_tensors_into(xs, ...) writes what
  // quantize_into(pack(xs, out_dtype=float32, align=block_size), ...) would (round to nearest; residual and
  // residual_out span the padded layout), and dequantize_tensors_(wire, ...) what
  // unpack(dequantize(wire, ..., out_dtype=float32, scale), outs, align=block_size) would. One dtype per list.
  m.def("quantize_tensors_into(Tensor[] xs, str fmt, int block_size, Tensor(a!)? residual, Tensor(b!) out, "
        "Tensor(c!)? residual_out=None) -> ()");
  m.def("dequantize_tensors_(Tensor wire, str fmt, int block_size, float scale, Tensor(a!)[] outs) -> ()");
  // The reduce of W such wires ([W, wire_bytes], summed in fp32 in rank order, times scale) into outs: what
  // unpack(reduce_quantized(wires, padded numel, fmt, block_size, scale), outs, align=block_size) would write.
  // With own (outs' layout, outs' dtype) and own_row, row own_row's term is own's exact values, its wire unread:
  // a reduce-scatter's own row is never sent, so it need not be quantized.
  m.def("reduce_quantized_tensors_(Tensor wires, str fmt, int block_size, float scale, Tensor(a!)[] outs, "
        "Tensor[]? own=None, int own_row=-1) -> ()");

  // ---- norm: residual-add + RMSNorm / LayerNorm (csrc/cpu/norm.cpp, csrc/cuda/norm.cu) ----
  // Forward: h = x + residual (when given), then normalize h over the last dim. y and h have x's dtype; the
  // per-row statistics (shape x.shape[:-1]) are float32 (float64 for float64 x) and feed the backward. h is an
  // empty tensor when residual is None. save_output only tells autograd which tensor backward keeps (the input
  // stream h, or the output y); the kernels ignore it.
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor? weight, float eps, bool save_output=False) "
        "-> (Tensor y, Tensor h, Tensor rstd)");
  m.def("add_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
        "bool save_output=False) -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // Backward: `saved` is h (saved_is_output=False) or y (True; then xhat = (y - bias) / weight). dh is the
  // incoming gradient of the h output (added to the result). dx is the gradient of h, i.e. of x and of residual
  // alike; dweight / dbias are empty when weight / bias are None.
  m.def("add_rms_norm_backward(Tensor dy, Tensor? dh, Tensor saved, Tensor? weight, Tensor rstd, "
        "bool saved_is_output) -> (Tensor dx, Tensor dweight)");
  m.def("add_layer_norm_backward(Tensor dy, Tensor? dh, Tensor saved, Tensor? weight, Tensor? bias, Tensor? mean, "
        "Tensor rstd, bool saved_is_output) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // ---- activation: bias+GeLU, bias+dropout+residual, SwiGLU/GeGLU (csrc/cpu/activation.cpp, ...cuda) ----
  // x [..., H], bias [H] or None; approximate "tanh" | "none" (like F.gelu). Math in fp32 (fp64 for fp64).
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate) -> Tensor");
  // -> (grad_x, grad_bias); grad_bias is empty [0] unless bias_grad. Recomputes gelu' from x and bias.
  m.def("bias_gelu_backward(Tensor grad, Tensor x, Tensor? bias, str approximate, bool bias_grad) -> "
        "(Tensor, Tensor)");
  // residual + dropout(x + bias, p); the mask comes from Philox(seed, offset, flat index of x), never stored.
  // seed/offset are SymInt so torch.compile keeps a per-call seed symbolic instead of recompiling for each value.
  m.def("bias_dropout_residual(Tensor x, Tensor? bias, Tensor residual, float p, SymInt seed, SymInt offset) "
        "-> Tensor");
  // -> (grad_x, grad_bias) from the regenerated mask; grad_residual is grad itself.
  m.def("bias_dropout_residual_backward(Tensor grad, float p, SymInt seed, SymInt offset, bool bias_grad) -> "
        "(Tensor, Tensor)");
  // act(a) * b, activation "silu" | "gelu" | "gelu_tanh"; b None splits a in half on the last dim.
  m.def("gated_act(Tensor a, Tensor? b, str activation) -> Tensor");
  // -> (grad_a, grad_b); when b is None: (grad of the whole a [..., 2H], empty [0]).
  m.def("gated_act_backward(Tensor grad, Tensor a, Tensor? b, str activation) -> (Tensor, Tensor)");

}

// A Python module so `import pyperf._C` loads this library (and so registers the ops). It carries no
// functions of its own: every op goes through torch.ops.pyperf, which is what torch.compile and the
// selective-checkpoint policies can see.
#if defined(PYPERF_CUDA_EMU)
#define PYPERF_MODULE_NAME "_C_emu"
#define PYPERF_MODULE_INIT PyInit__C_emu
#else
#define PYPERF_MODULE_NAME "_C"
#define PYPERF_MODULE_INIT PyInit__C
#endif
static struct PyModuleDef pyperf_module = {PyModuleDef_HEAD_INIT, PYPERF_MODULE_NAME, "pyperf's compiled ops", -1,
                                           nullptr};

PyMODINIT_FUNC PYPERF_MODULE_INIT(void) {
  PyObject* m = PyModule_Create(&pyperf_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "VERSION", PYPERF_VERSION_STR);
  PyModule_AddStringConstant(m, "TORCH_VERSION", PYPERF_TORCH_VERSION_STR);
  PyModule_AddStringConstant(m, "CUDA_ARCHS", PYPERF_CUDA_ARCHS_STR);
  PyModule_AddIntConstant(m, "WITH_CUDA", PYPERF_BUILT_WITH_CUDA);
  return m;
}
