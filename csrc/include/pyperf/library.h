// The op namespace of registrations: torch.ops.pyperf, or torch.ops.pyperf_emu in the SIMT emulation's test-only
// extension (csrc/emu, PYPERF_CUDA_EMU), which registers the same schemas and C++ autograd over the emulated CUDA
// kernels. Use PYPERF_LIBRARY / PYPERF_LIBRARY_IMPL / PYPERF_OP wherever a registration or an op name appears.
#pragma once
#include <torch/library.h>

#if defined(PYPERF_CUDA_EMU)
#define PYPERF_NS pyperf_emu
#else
#define PYPERF_NS pyperf
#endif

#define PYPERF_STR_(x) #x
#define PYPERF_STR(x) PYPERF_STR_(x)
// "pyperf::name" (or "pyperf_emu::name")
#define PYPERF_OP(name) PYPERF_STR(PYPERF_NS) "::" name
// One indirection so PYPERF_NS is expanded before TORCH_LIBRARY pastes it into identifiers.
#define PYPERF_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define PYPERF_LIBRARY(m) PYPERF_LIBRARY_(PYPERF_NS, m)
#define PYPERF_LIBRARY_IMPL_(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
#define PYPERF_LIBRARY_IMPL(k, m) PYPERF_LIBRARY_IMPL_(PYPERF_NS, k, m)
