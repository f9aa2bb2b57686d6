// Torch-independent macros shared by host and device code (usable from the CMake C++ tests).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYPERF_HD __host__ __device__ __forceinline__
#else
#define PYPERF_HD inline
#endif
