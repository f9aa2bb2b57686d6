// The launch plan of the column-parallel CUDA kernels (csrc/cuda/activation.cu, and the long-row backward of
// csrc/cuda/norm.cu): host-only and torch-independent.
//
// 256-thread blocks: x covers the column vectors (up to 128 per block), y the rows, which each thread walks with a
// grid stride, so it loads its per-column values once and keeps per-column partial sums (a bias or weight
// gradient) in registers. Enough row lanes to fill the GPU (2048 threads per SM); when reducing, at most one lane
// per 8 rows, so the [slots, columns] partials stay small next to the data.
#pragma once
#include <algorithm>
#include <cstdint>

namespace pyperf {

struct ColumnPlan {
  unsigned gx = 0, gy = 0, bx = 0, by = 0;
  int64_t slots = 0;  // row lanes, gy * by: the rows of the partial sums. 0: nothing to launch
};

// rows == 0 or col_vecs == 0 gives the empty plan (slots == 0): callers launch nothing.
inline ColumnPlan column_plan(int64_t rows, int64_t col_vecs, bool reduce, int sm_count) {
  ColumnPlan p;
  if (rows <= 0 || col_vecs <= 0) return p;
  int bx = 32;
  while (bx < 128 && bx < col_vecs) bx *= 2;
  const int by = 256 / bx;
  const int64_t gx = (col_vecs + bx - 1) / bx;
  const int64_t target_threads = static_cast<int64_t>(sm_count) * 2048;
  int64_t lanes = std::max<int64_t>(1, target_threads / (gx * bx));
  if (reduce) lanes = std::min(lanes, std::max<int64_t>(1, (rows + 7) / 8));
  lanes = std::min(lanes, rows);
  const int64_t gy = std::min<int64_t>(65535, std::max<int64_t>(1, (lanes + by - 1) / by));
  p.gx = static_cast<unsigned>(gx);
  p.gy = static_cast<unsigned>(gy);
  p.bx = static_cast<unsigned>(bx);
  p.by = static_cast<unsigned>(by);
  p.slots = gy * by;
  return p;
}

}  // namespace pyperf
