// CPU kernels of residual-add + RMSNorm / LayerNorm, forward and backward.
//
// Rows are split over threads with at::parallel_for. Per row the forward makes three passes (LayerNorm: sum,
// sum of squared deviations, output; RMSNorm: two) and the backward three (g = dy * w with the weight/bias
// partials, the row sums, dx), each over one row that stays in cache after the first. float32/float64 rows are
// read in place; bf16/fp16 rows are converted once per row into a float buffer in the forward and on the fly in
// the backward. Every loop is written so that the compiler vectorizes it (restrict rows, one store width per
// loop, no reduction mixed with stores): a loop it leaves scalar costs 2-4x. Buffers read or written next to the
// row streams (g, the weight-gradient partials, the float copies of w and b) sit at fixed page offsets from them
// (at_page_offset: 4K aliasing cost up to 1.3x). The small weight-gradient partials are reused between calls: a
// fresh page costs several microseconds on a VM.
// Reductions use kLanes partial sums in a fixed order folded by a fixed tree: vectorizable without -ffast-math,
// and the same bits whatever the thread count. The weight/bias gradients are reduced per fixed group of rows
// (independent of the thread count) and then summed over the groups in order: deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pyperf/dispatch.h"
#include "pyperf/norm.h"

namespace pyperf {
namespace {

// 64 partial sums: four AVX-512 (eight AVX2) accumulators, enough independent add chains to hide the FP add
// latency that bounds a reduction over an L1-resident row.
constexpr int kLanes = 64;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// Built for AVX-512, AVX2 + FMA and the baseline and picked at load time, like ATen's own CPU kernels.
#define PYPERF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYPERF_CPU_CLONES
#endif
#if defined(__GNUC__)
#define PYPERF_INLINE inline __attribute__((always_inline))
#define PYPERF_RESTRICT __restrict__
#else
#define PYPERF_INLINE inline
#define PYPERF_RESTRICT
#endif

template <typename acc_t>
PYPERF_INLINE acc_t fold_lanes(acc_t* part) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) part[k] += part[k + w];
  return part[0];
}

// The sum of f(j) over [0, n).
// The sum of v (SQUARE: of v * v) over one row.
template <bool SQUARE, typename acc_t>
PYPERF_INLINE acc_t row_sum(const acc_t* PYPERF_RESTRICT v, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += SQUARE ? v[j + k] * v[j + k] : v[j + k];
  for (int k = 0; j < n; ++j, ++k) part[k] += SQUARE ? v[j] * v[j] : v[j];
  return fold_lanes(part);
}

// The sum of (v - mu)^2 over one row.
template <typename acc_t>
PYPERF_INLINE acc_t row_sum_sq_dev(const acc_t* PYPERF_RESTRICT v, int64_t n, acc_t mu) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const acc_t d = v[j + k] - mu;
      part[k] += d * d;
    }
  for (int k = 0; j < n; ++j, ++k) {
    const acc_t d = v[j] - mu;
    part[k] += d * d;
  }
  return fold_lanes(part);
}

// h = x + r rounded to the storage type (what is returned and saved), and v = h as acc_t; either of r / v may be
// absent (no residual: v = x; float32/float64: v is h itself).
template <typename scalar_t, typename acc_t>
PYPERF_INLINE void add_convert_row(const scalar_t* PYPERF_RESTRICT x, const scalar_t* PYPERF_RESTRICT r,
                                   scalar_t* PYPERF_RESTRICT h, acc_t* PYPERF_RESTRICT v, int64_t n) {
  if (r && v) {
    // Two loops: one loop with both stores (two element widths) is left scalar by the compiler.
    for (int64_t j = 0; j < n; ++j)
      v[j] = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x[j]) + static_cast<acc_t>(r[j])));
    for (int64_t j = 0; j < n; ++j) h[j] = static_cast<scalar_t>(v[j]);  // exact: v holds rounded values
  } else if (r) {
    for (int64_t j = 0; j < n; ++j) h[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) + static_cast<acc_t>(r[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(x[j]);
  }
}

// weight / bias (dtype of x or float32) as an acc_t vector; `fill` of size n when absent (fill < 0: empty).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> affine_as_acc(const c10::optional<at::Tensor>& p, int64_t n = 0, int fill = -1) {
  std::vector<acc_t> out;
  if (!norm::present(p)) {
    if (fill >= 0) out.assign(n, static_cast<acc_t>(fill));
    return out;
  }
  n = p->numel();
  out.resize(n);
  if (p->scalar_type() == c10::kFloat) {
    const float* src = p->data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(src[j]);
  } else {
    const scalar_t* src = p->data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(src[j]);
  }
  return out;
}

template <typename scalar_t, typename acc_t>
void store_affine_grad(const acc_t* g, at::Tensor& out) {
  const int64_t n = out.numel();
  if (out.scalar_type() == c10::kFloat) {
    float* dst = out.data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(g[j]);
  } else {
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(g[j]);
  }
}

// Scratch that outlives the call (one per calling thread): the weight-gradient partials of the backward. Kept
// only while small; larger requests get a one-off buffer.
template <typename acc_t>
acc_t* reusable_scratch(size_t n, std::vector<std::byte>& oneoff) {
  constexpr size_t kKeepBytes = size_t(4) << 20;
  thread_local std::vector<std::byte> kept;
  const size_t bytes = n * sizeof(acc_t);
  std::vector<std::byte>& buf = bytes <= kKeepBytes ? kept : oneoff;
  if (buf.size() < bytes) buf.resize(bytes);
  return reinterpret_cast<acc_t*>(buf.data());
}

constexpr int64_t kPage = 4096;

// The first address at or after p whose offset in a 4 KiB page is that of `want`, rounded down to 16 bytes. A load
// whose address matches a pending store's in the low 12 bits waits for it (4K aliasing); the row tensors (x, h, y;
// dy, saved, dx) are page-aligned allocations walked in lockstep, so buffers used in the same loops sit a fixed
// distance away. The rounding keeps the float buffers placed there aligned (a bf16 row's offset can be odd in
// float units: UBSan's misaligned store), and p, from malloc, is 16-byte aligned.
inline char* at_page_offset(char* p, uintptr_t want) {
  const uintptr_t have = reinterpret_cast<uintptr_t>(p);
  return p + (((want - have) & (kPage - 1)) & ~uintptr_t{15});
}

// A copy of v whose first element sits at the page offset of `want` (see at_page_offset), in `store`.
template <typename acc_t>
const acc_t* placed_copy(const std::vector<acc_t>& v, std::vector<char>& store, uintptr_t want) {
  if (v.empty()) return nullptr;
  store.resize(v.size() * sizeof(acc_t) + kPage);
  acc_t* dst = reinterpret_cast<acc_t*>(at_page_offset(store.data(), want));
  std::copy(v.begin(), v.end(), dst);
  return dst;
}

template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp;
  const scalar_t* rp;
  const acc_t* wp;
  const acc_t* bp;
  scalar_t* yp;
  scalar_t* hp;
  acc_t* mp;
  acc_t* sp;
  acc_t e;
  int64_t N;
};

// y = (v - mu) * rs * w + b over one row (w, b optional).
template <typename scalar_t, typename acc_t>
PYPERF_INLINE void write_y(const acc_t* PYPERF_RESTRICT v, const acc_t* PYPERF_RESTRICT wp,
                           const acc_t* PYPERF_RESTRICT bp, scalar_t* PYPERF_RESTRICT yr, acc_t mu, acc_t rs,
                           int64_t N) {
  if (wp && bp) {
    for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((v[j] - mu) * rs * wp[j] + bp[j]);
  } else if (wp) {
    for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((v[j] - mu) * rs * wp[j]);
  } else if (bp) {
    for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((v[j] - mu) * rs + bp[j]);
  } else {
    for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((v[j] - mu) * rs);
  }
}

// Rows [begin, end) of the forward.
template <typename scalar_t, bool RMS>
PYPERF_CPU_CLONES void fwd_rows(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;  // rows are read as they are, no float copy
  const int64_t N = a.N;
  std::vector<acc_t> buf(kInPlace ? 0 : N);
  acc_t* vb = buf.data();
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = a.xp + row * N;
    const acc_t* v;
    if (a.rp) {
      // Normalize the rounded h that is returned (and saved for backward), so forward and backward agree.
      scalar_t* hr = a.hp + row * N;
      add_convert_row<scalar_t, acc_t>(xr, a.rp + row * N, hr, kInPlace ? nullptr : vb, N);
      if constexpr (kInPlace) {
        v = hr;
      } else {
        v = vb;
      }
    } else if constexpr (kInPlace) {
      v = xr;
    } else {
      add_convert_row<scalar_t, acc_t>(xr, nullptr, nullptr, vb, N);
      v = vb;
    }
    const acc_t s1 = row_sum<RMS>(v, N);  // LayerNorm: the sum; RMSNorm: the sum of squares
    acc_t mu = 0, var = 0;
    if (N > 0) {
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
      if constexpr (RMS) {
        var = s1 * inv_n;
      } else {
        mu = s1 * inv_n;
        // Two passes (the mean, then the squared deviations) over a cached row: no cancellation.
        var = row_sum_sq_dev(v, N, mu) * inv_n;
      }
    }
    const acc_t rs = acc_t(1) / std::sqrt(var + a.e);
    if (a.mp) a.mp[row] = mu;
    a.sp[row] = rs;
    write_y<scalar_t, acc_t>(v, a.wp, a.bp, a.yp + row * N, mu, rs, N);
  }
}

template <typename scalar_t, bool RMS>
void norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
              const c10::optional<at::Tensor>& bias, double eps, at::Tensor& y, at::Tensor& h, at::Tensor* mean,
              at::Tensor& rstd, norm::Rows rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = rows.M, N = rows.N;
  if (M == 0) return;
  const std::vector<acc_t> w = affine_as_acc<scalar_t, acc_t>(weight);
  const std::vector<acc_t> b = affine_as_acc<scalar_t, acc_t>(bias);
  // The output loop reads w and b while it writes y: keep them 1 and 3 KiB from y's page offset.
  std::vector<char> w_store, b_store;
  const acc_t* wp = placed_copy(w, w_store, reinterpret_cast<uintptr_t>(y.data_ptr()) + 1024);
  const acc_t* bp = placed_copy(b, b_store, reinterpret_cast<uintptr_t>(y.data_ptr()) + 3072);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = norm::present(residual) ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* hp = rp ? h.data_ptr<scalar_t>() : nullptr;
  acc_t* mp = mean ? mean->data_ptr<acc_t>() : nullptr;
  acc_t* sp = rstd.data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
  // About 32K elements per task: big enough that the fork/join cost of a task vanishes next to its work.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));

  const FwdArgs<scalar_t> args{xp, rp, wp, bp, yp, hp, mp, sp, e, N};
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { fwd_rows<scalar_t, RMS>(args, begin, end); });
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dyp;
  const scalar_t* dhp;
  const scalar_t* sp;
  const acc_t* wp;   // weight, or ones
  const acc_t* ibp;  // saved is the output: bias (or zeros) to subtract from y
  const acc_t* iwp;  // saved is the output: 1 / weight (or ones)
  const acc_t* mup;
  const acc_t* rsp;
  scalar_t* dxp;
  acc_t* dw_part;
  acc_t* db_part;
  acc_t inv_n;
  int64_t M, N, G;
  int64_t PS;  // elements from one group's partial row to the next
};

// xhat of one element: (x - mean) * rstd from the input, or (y - b) / w from the output (SAVED_OUT; ib = b or 0,
// iw = 1 / w or 1; w must have no zeros, docs/norm.md). A subtraction then a product: no FMA can fuse them, so
// every pass that recomputes it gets the same bits.
template <bool SAVED_OUT, typename acc_t>
PYPERF_INLINE acc_t xhat_of(acc_t s, acc_t mu, acc_t rs, const acc_t* PYPERF_RESTRICT ibp,
                            const acc_t* PYPERF_RESTRICT iwp, int64_t j) {
  if constexpr (SAVED_OUT) {
    return (s - ibp[j]) * iwp[j];
  } else {
    return (s - mu) * rs;
  }
}

// One row of the backward, in three loops that each vectorize on their own (one loop doing the elementwise work
// and the row sums together stays scalar: the compiler cannot prove the partial-sum lanes apart from the rows):
//  1. from dy and the saved row (the reads from memory): g = dy * w into a row buffer, and the weight / bias
//     gradient partials of the group (DW / DB);
//  2. the row sums of g and g * xhat (from cache);
//  3. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh).
// g is kept rather than recomputed so that dx subtracts exactly the values that were summed: a recomputed dy * w
// could be fused into an FMA with the subtraction and differ in the last bit, which rstd amplifies when the
// variance is ~0. xhat is recomputed (see xhat_of): one buffer less keeps the row's working set in L1.
template <typename scalar_t, typename acc_t, bool RMS, bool SAVED_OUT, bool DW, bool DB>
PYPERF_INLINE void bwd_row(const scalar_t* PYPERF_RESTRICT dyr, const scalar_t* PYPERF_RESTRICT sr,
                           const scalar_t* PYPERF_RESTRICT dhr, const acc_t* PYPERF_RESTRICT wp,
                           const acc_t* PYPERF_RESTRICT ibp, const acc_t* PYPERF_RESTRICT iwp, acc_t mu, acc_t rs,
                           acc_t inv_n, acc_t* PYPERF_RESTRICT dwp, acc_t* PYPERF_RESTRICT dbp,
                           acc_t* PYPERF_RESTRICT gb, scalar_t* PYPERF_RESTRICT dxr, int64_t N) {
  for (int64_t j = 0; j < N; ++j) {
    const acc_t d = static_cast<acc_t>(dyr[j]);
    gb[j] = d * wp[j];
    if constexpr (DW) dwp[j] += d * xhat_of<SAVED_OUT>(static_cast<acc_t>(sr[j]), mu, rs, ibp, iwp, j);
    if constexpr (DB) dbp[j] += d;
  }
  acc_t p1[kLanes] = {}, p2[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const acc_t xh = xhat_of<SAVED_OUT>(static_cast<acc_t>(sr[j + k]), mu, rs, ibp, iwp, j + k);
      if constexpr (!RMS) p1[k] += gb[j + k];
      p2[k] += gb[j + k] * xh;
    }
  for (int k = 0; j < N; ++j, ++k) {
    const acc_t xh = xhat_of<SAVED_OUT>(static_cast<acc_t>(sr[j]), mu, rs, ibp, iwp, j);
    if constexpr (!RMS) p1[k] += gb[j];
    p2[k] += gb[j] * xh;
  }
  const acc_t k1 = RMS ? acc_t(0) : fold_lanes(p1) * inv_n;
  const acc_t k2 = fold_lanes(p2) * inv_n;
  if (dhr) {
    for (int64_t i = 0; i < N; ++i) {
      const acc_t xh = xhat_of<SAVED_OUT>(static_cast<acc_t>(sr[i]), mu, rs, ibp, iwp, i);
      dxr[i] = static_cast<scalar_t>(rs * (gb[i] - k1 - xh * k2) + static_cast<acc_t>(dhr[i]));
    }
  } else {
    for (int64_t i = 0; i < N; ++i) {
      const acc_t xh = xhat_of<SAVED_OUT>(static_cast<acc_t>(sr[i]), mu, rs, ibp, iwp, i);
      dxr[i] = static_cast<scalar_t>(rs * (gb[i] - k1 - xh * k2));
    }
  }
}

// Row groups [gbegin, gend) of the backward.
template <typename scalar_t, bool RMS, bool SAVED_OUT>
PYPERF_CPU_CLONES void bwd_groups(const BwdArgs<scalar_t>& a, int64_t gbegin, int64_t gend) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = a.M, N = a.N, G = a.G;
  // g of the row (see bwd_row), placed at a fixed distance from dy's address modulo 4 KiB (see at_page_offset).
  std::vector<char> row_buf(N * sizeof(acc_t) + kPage);
  for (int64_t grp = gbegin; grp < gend; ++grp) {
    acc_t* dwp = a.dw_part ? a.dw_part + grp * a.PS : nullptr;
    acc_t* dbp = a.db_part ? a.db_part + grp * a.PS : nullptr;
    if (dwp) std::fill(dwp, dwp + N, acc_t(0));
    if (dbp) std::fill(dbp, dbp + N, acc_t(0));
    const int64_t r0 = grp * M / G, r1 = (grp + 1) * M / G;
    for (int64_t row = r0; row < r1; ++row) {
      const scalar_t* dyr = a.dyp + row * N;
      const scalar_t* sr = a.sp + row * N;
      const scalar_t* dhr = a.dhp ? a.dhp + row * N : nullptr;
      scalar_t* dxr = a.dxp + row * N;
      const acc_t rs = a.rsp[row];
      const acc_t mu = (!RMS && !SAVED_OUT) ? a.mup[row] : acc_t(0);
      const uintptr_t off = reinterpret_cast<uintptr_t>(dyr);
      acc_t* gb = reinterpret_cast<acc_t*>(at_page_offset(row_buf.data(), off + 2048));
#define PYPERF_BWD_ROW(DW, DB)                                                                                   \
  bwd_row<scalar_t, acc_t, RMS, SAVED_OUT, DW, DB>(dyr, sr, dhr, a.wp, a.ibp, a.iwp, mu, rs, a.inv_n, dwp, dbp, gb, \
                                                   dxr, N)
      if (dwp && dbp) {
        PYPERF_BWD_ROW(true, true);
      } else if (dwp) {
        PYPERF_BWD_ROW(true, false);
      } else if (dbp) {
        PYPERF_BWD_ROW(false, true);
      } else {
        PYPERF_BWD_ROW(false, false);
      }
#undef PYPERF_BWD_ROW
    }
  }
}

template <typename scalar_t, bool RMS>
void norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& saved,
              const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
              const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool saved_is_output, at::Tensor& dx,
              at::Tensor& dweight, at::Tensor& dbias, norm::Rows rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = rows.M, N = rows.N;
  if (M == 0) return;
  const bool want_dw = norm::present(weight), want_db = !RMS && norm::present(bias);
  const std::vector<acc_t> w = affine_as_acc<scalar_t, acc_t>(weight, N, 1);
  std::vector<acc_t> ib, iw;
  if (saved_is_output) {
    ib = RMS ? std::vector<acc_t>(N, acc_t(0)) : affine_as_acc<scalar_t, acc_t>(bias, N, 0);
    iw.resize(N);
    for (int64_t j = 0; j < N; ++j) iw[j] = acc_t(1) / w[j];
  }
  // Fixed groups of rows (at least 16 rows each, at most 64 groups), each reduced by one task in row order: the
  // partial sums do not depend on the thread count.
  const int64_t G = std::clamp<int64_t>(M / 16, 1, 64);
  // The partial rows start on the same page offset (a whole number of pages apart), at a fixed distance from dy's
  // (see at_page_offset): dweight's 1 KiB after it, dbias's 3 KiB, g's 2 KiB.
  const int64_t PS = static_cast<int64_t>((N * sizeof(acc_t) + kPage - 1) / kPage * kPage / sizeof(acc_t));
  const size_t part_bytes = static_cast<size_t>(G * PS) * sizeof(acc_t);
  const uintptr_t dy_page = reinterpret_cast<uintptr_t>(dy.data_ptr());
  std::vector<std::byte> oneoff;
  acc_t* dw_part = nullptr;
  acc_t* db_part = nullptr;
  if (want_dw || want_db) {
    char* base = reusable_scratch<char>((want_dw + want_db) * part_bytes + 2 * kPage, oneoff);
    if (want_dw) {
      dw_part = reinterpret_cast<acc_t*>(at_page_offset(base, dy_page + 1024));
      base = reinterpret_cast<char*>(dw_part) + part_bytes;
    }
    if (want_db) db_part = reinterpret_cast<acc_t*>(at_page_offset(base, dy_page + 3072));
  }

  // The first loop reads w (and ib, iw) while it writes g and the partials: 2.5, 0.5 and 3.5 KiB from dy.
  std::vector<char> w_store, ib_store, iw_store;
  const acc_t* wpl = placed_copy(w, w_store, dy_page + 2560);
  const acc_t* ibpl = placed_copy(ib, ib_store, dy_page + 512);
  const acc_t* iwpl = placed_copy(iw, iw_store, dy_page + 3584);
  const BwdArgs<scalar_t> args{dy.data_ptr<scalar_t>(),
                               norm::present(dh) ? dh->data_ptr<scalar_t>() : nullptr,
                               saved.data_ptr<scalar_t>(),
                               wpl,
                               ibpl,
                               iwpl,
                               (!RMS && !saved_is_output) ? mean->data_ptr<acc_t>() : nullptr,
                               rstd.data_ptr<acc_t>(),
                               dx.data_ptr<scalar_t>(),
                               dw_part,
                               db_part,
                               N > 0 ? acc_t(1) / static_cast<acc_t>(N) : acc_t(0),
                               M,
                               N,
                               G,
                               PS};
  at::parallel_for(0, G, 1, [&](int64_t gbegin, int64_t gend) {
    if (saved_is_output) {
      bwd_groups<scalar_t, RMS, true>(args, gbegin, gend);
    } else {
      bwd_groups<scalar_t, RMS, false>(args, gbegin, gend);
    }
  });

  auto finish = [&](const acc_t* p, at::Tensor& out) {
    std::vector<acc_t> total(p, p + N);
    for (int64_t grp = 1; grp < G; ++grp) {
      const acc_t* q = p + grp * PS;
      for (int64_t j = 0; j < N; ++j) total[j] += q[j];
    }
    store_affine_grad<scalar_t, acc_t>(total.data(), out);
  };
  if (want_dw) finish(dw_part, dweight);
  if (want_db) finish(db_part, dbias);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x,
                                                                const c10::optional<at::Tensor>& residual,
                                                                const c10::optional<at::Tensor>& weight, double eps,
                                                                bool save_output) {
  (void)save_output;
  const norm::Rows rows = norm::check_fwd(x, residual, weight, c10::nullopt, eps, /*allow_double=*/true);
  at::Tensor y = norm::empty_like_x(x);
  at::Tensor h = norm::present(residual) ? norm::empty_like_x(x) : norm::empty_none(x);
  at::Tensor rstd = norm::empty_stat(x);
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "add_rms_norm_cpu", [&] {
    norm_fwd<scalar_t, true>(x, residual, weight, c10::nullopt, eps, y, h, nullptr, rstd, rows);
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool save_output) {
  (void)save_output;
  const norm::Rows rows = norm::check_fwd(x, residual, weight, bias, eps, /*allow_double=*/true);
  at::Tensor y = norm::empty_like_x(x);
  at::Tensor h = norm::present(residual) ? norm::empty_like_x(x) : norm::empty_none(x);
  at::Tensor mean = norm::empty_stat(x);
  at::Tensor rstd = norm::empty_stat(x);
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "add_layer_norm_cpu", [&] {
    norm_fwd<scalar_t, false>(x, residual, weight, bias, eps, y, h, &mean, rstd, rows);
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_backward_cpu(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                             const at::Tensor& saved,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& rstd, bool saved_is_output) {
  const norm::Rows rows = norm::check_bwd(dy, dh, saved, weight, c10::nullopt, c10::nullopt, rstd, saved_is_output,
                                          /*layer_norm=*/false, /*allow_double=*/true);
  at::Tensor dx = norm::empty_like_x(saved);
  at::Tensor dweight = norm::affine_grad_out(weight, saved, rows.M);
  at::Tensor dbias_unused;
  PYPERF_DISPATCH_FLOAT(saved.scalar_type(), "add_rms_norm_backward_cpu", [&] {
    norm_bwd<scalar_t, true>(dy, dh, saved, weight, c10::nullopt, c10::nullopt, rstd, saved_is_output, dx, dweight,
                             dbias_unused, rows);
  });
  return {dx, dweight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cpu(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& saved,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool saved_is_output) {
  const norm::Rows rows = norm::check_bwd(dy, dh, saved, weight, bias, mean, rstd, saved_is_output,
                                          /*layer_norm=*/true, /*allow_double=*/true);
  at::Tensor dx = norm::empty_like_x(saved);
  at::Tensor dweight = norm::affine_grad_out(weight, saved, rows.M);
  at::Tensor dbias = norm::affine_grad_out(bias, saved, rows.M);
  PYPERF_DISPATCH_FLOAT(saved.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    norm_bwd<scalar_t, false>(dy, dh, saved, weight, bias, mean, rstd, saved_is_output, dx, dweight, dbias, rows);
  });
  return {dx, dweight, dbias};
}

TORCH_LIBRARY_IMPL(pyperf, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace pyperf
