// The CUDA pack_out / unpack of csrc/cuda/pack.cu, callable from other CUDA sources (the quant ops that are
// composed of pack + quantize on CUDA) without a trip through the dispatcher.
#pragma once
#include <ATen/core/Tensor.h>

namespace pyperf {

void cuda_pack_out(at::TensorList tensors, double scale, int64_t align, const at::Tensor& out);
void cuda_unpack(const at::Tensor& flat, at::TensorList tensors, double scale, int64_t align);

}  // namespace pyperf
