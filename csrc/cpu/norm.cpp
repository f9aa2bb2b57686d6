// CPU kernels of residual-add + RMSNorm / LayerNorm, forward and backward.
//
// Rows are split over threads with at::parallel_for; each row is first converted into a float (double for
// float64) buffer so the inner loops are plain float loops the compiler vectorizes. Reductions use 16 partial
// sums in a fixed order: vectorizable without -ffast-math, and the same bits whatever the thread count.
// The weight/bias gradients are reduced per fixed group of rows (independent of the thread count) and then
// summed over the groups in order: deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "pyperf/dispatch.h"
#include "pyperf/norm.h"

namespace pyperf {
namespace {

constexpr int kLanes = 16;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYPERF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYPERF_CPU_CLONES
#endif

template <typename acc_t>
acc_t sum_of(const acc_t* v, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += v[j + k];
  for (int k = 0; j < n; ++j, ++k) part[k] += v[j];
  acc_t s = 0;
  for (int k = 0; k < kLanes; ++k) s += part[k];
  return s;
}

template <typename acc_t>
acc_t sum_sq_dev(const acc_t* v, int64_t n, acc_t mu) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      acc_t d = v[j + k] - mu;
      part[k] += d * d;
    }
  for (int k = 0; j < n; ++j, ++k) {
    acc_t d = v[j] - mu;
    part[k] += d * d;
  }
  acc_t s = 0;
  for (int k = 0; k < kLanes; ++k) s += part[k];
  return s;
}

template <typename acc_t>
acc_t dot_of(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += a[j + k] * b[j + k];
  for (int k = 0; j < n; ++j, ++k) part[k] += a[j] * b[j];
  acc_t s = 0;
  for (int k = 0; k < kLanes; ++k) s += part[k];
  return s;
}

// weight / bias (dtype of x or float32) as an acc_t vector; empty when absent.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> affine_as_acc(const c10::optional<at::Tensor>& p) {
  std::vector<acc_t> out;
  if (!norm::present(p)) return out;
  const int64_t n = p->numel();
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

// Rows [begin, end) of the forward. Built twice (x86-64-v3: AVX2 + FMA, and the baseline) and picked at load
// time, like ATen's own CPU kernels, so the float loops get 256-bit vectors where the CPU has them.
template <typename scalar_t, bool RMS>
PYPERF_CPU_CLONES void fwd_rows(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = a.xp;
  const scalar_t* rp = a.rp;
  const acc_t* wp = a.wp;
  const acc_t* bp = a.bp;
  scalar_t* yp = a.yp;
  scalar_t* hp = a.hp;
  acc_t* mp = a.mp;
  acc_t* sp = a.sp;
  const acc_t e = a.e;
  const int64_t N = a.N;
  std::vector<acc_t> buf(N);
  acc_t* v = buf.data();
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = xp + row * N;
    scalar_t* yr = yp + row * N;
    if (rp) {
      // Normalize the rounded h that is returned (and saved for backward), so forward and backward agree.
      const scalar_t* rr = rp + row * N;
      scalar_t* hr = hp + row * N;
      for (int64_t j = 0; j < N; ++j) {
        scalar_t s = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) + static_cast<acc_t>(rr[j]));
        hr[j] = s;
        v[j] = static_cast<acc_t>(s);
      }
    } else {
      for (int64_t j = 0; j < N; ++j) v[j] = static_cast<acc_t>(xr[j]);
    }
    acc_t mu = 0;
    if (!RMS && N > 0) mu = sum_of(v, N) / static_cast<acc_t>(N);
    const acc_t var = N > 0 ? sum_sq_dev(v, N, mu) / static_cast<acc_t>(N) : acc_t(0);
    const acc_t rs = acc_t(1) / std::sqrt(var + e);
    if (mp) mp[row] = mu;
    sp[row] = rs;
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
  const acc_t* wp = w.empty() ? nullptr : w.data();
  const acc_t* bp = b.empty() ? nullptr : b.data();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = norm::present(residual) ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* hp = rp ? h.data_ptr<scalar_t>() : nullptr;
  acc_t* mp = mean ? mean->data_ptr<acc_t>() : nullptr;
  acc_t* sp = rstd.data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
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
  const acc_t* wp;
  const acc_t* bp;
  const acc_t* mup;
  const acc_t* rsp;
  scalar_t* dxp;
  acc_t* dw_part;
  acc_t* db_part;
  acc_t inv_n;
  int64_t M, N, G;
  bool saved_is_output;
};

// Row groups [gbegin, gend) of the backward (built like fwd_rows).
template <typename scalar_t, bool RMS>
PYPERF_CPU_CLONES void bwd_groups(const BwdArgs<scalar_t>& a, int64_t gbegin, int64_t gend) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dyp = a.dyp;
  const scalar_t* dhp = a.dhp;
  const scalar_t* sp = a.sp;
  const acc_t* wp = a.wp;
  const acc_t* bp = a.bp;
  const acc_t* mup = a.mup;
  const acc_t* rsp = a.rsp;
  scalar_t* dxp = a.dxp;
  const acc_t inv_n = a.inv_n;
  const int64_t M = a.M, N = a.N, G = a.G;
  const bool saved_is_output = a.saved_is_output;
  const bool want_dw = a.dw_part != nullptr, want_db = a.db_part != nullptr;
  std::vector<acc_t> xh_buf(N), g_buf(N);
  acc_t* xh = xh_buf.data();
  acc_t* g = g_buf.data();
  for (int64_t grp = gbegin; grp < gend; ++grp) {
    acc_t* dwp = want_dw ? a.dw_part + grp * N : nullptr;
    acc_t* dbp = want_db ? a.db_part + grp * N : nullptr;
    const int64_t r0 = grp * M / G, r1 = (grp + 1) * M / G;
    for (int64_t row = r0; row < r1; ++row) {
      const scalar_t* dyr = dyp + row * N;
      const scalar_t* sr = sp + row * N;
      const acc_t rs = rsp[row];
      if (!saved_is_output) {
        const acc_t mu = mup ? mup[row] : acc_t(0);
        for (int64_t j = 0; j < N; ++j) xh[j] = (static_cast<acc_t>(sr[j]) - mu) * rs;
      } else {
        // y = xhat * w + b  =>  xhat = (y - b) / w  (w must have no zeros; see docs/norm.md).
        const acc_t* bb = RMS ? nullptr : bp;
        if (wp && bb) {
          for (int64_t j = 0; j < N; ++j) xh[j] = (static_cast<acc_t>(sr[j]) - bb[j]) / wp[j];
        } else if (wp) {
          for (int64_t j = 0; j < N; ++j) xh[j] = static_cast<acc_t>(sr[j]) / wp[j];
        } else if (bb) {
          for (int64_t j = 0; j < N; ++j) xh[j] = static_cast<acc_t>(sr[j]) - bb[j];
        } else {
          for (int64_t j = 0; j < N; ++j) xh[j] = static_cast<acc_t>(sr[j]);
        }
      }
      if (wp) {
        for (int64_t j = 0; j < N; ++j) {
          const acc_t d = static_cast<acc_t>(dyr[j]);
          dwp[j] += d * xh[j];
          g[j] = d * wp[j];
        }
      } else {
        for (int64_t j = 0; j < N; ++j) g[j] = static_cast<acc_t>(dyr[j]);
      }
      if (dbp) {
        for (int64_t j = 0; j < N; ++j) dbp[j] += static_cast<acc_t>(dyr[j]);
      }
      const acc_t c1 = RMS ? acc_t(0) : sum_of(g, N) * inv_n;
      const acc_t c2 = dot_of(g, xh, N) * inv_n;
      scalar_t* dxr = dxp + row * N;
      if (dhp) {
        const scalar_t* dhr = dhp + row * N;
        for (int64_t j = 0; j < N; ++j)
          dxr[j] = static_cast<scalar_t>(rs * (g[j] - c1 - xh[j] * c2) + static_cast<acc_t>(dhr[j]));
      } else {
        for (int64_t j = 0; j < N; ++j) dxr[j] = static_cast<scalar_t>(rs * (g[j] - c1 - xh[j] * c2));
      }
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
  const std::vector<acc_t> w = affine_as_acc<scalar_t, acc_t>(weight);
  const std::vector<acc_t> b = affine_as_acc<scalar_t, acc_t>(bias);
  const acc_t* wp = w.empty() ? nullptr : w.data();
  const acc_t* bp = b.empty() ? nullptr : b.data();
  const bool want_dw = wp != nullptr, want_db = !RMS && bp != nullptr;
  // Fixed groups of rows, each reduced by one task: the partial sums do not depend on the thread count.
  const int64_t G = std::min<int64_t>(M, 64);
  std::vector<acc_t> dw_part(want_dw ? G * N : 0), db_part(want_db ? G * N : 0);

  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* dhp = norm::present(dh) ? dh->data_ptr<scalar_t>() : nullptr;
  const scalar_t* sp = saved.data_ptr<scalar_t>();
  const acc_t* mup = (!RMS && !saved_is_output) ? mean->data_ptr<acc_t>() : nullptr;
  const acc_t* rsp = rstd.data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const acc_t inv_n = N > 0 ? acc_t(1) / static_cast<acc_t>(N) : acc_t(0);

  const BwdArgs<scalar_t> args{dyp, dhp, sp, wp, bp, mup, rsp, dxp, want_dw ? dw_part.data() : nullptr,
                               want_db ? db_part.data() : nullptr, inv_n, M, N, G, saved_is_output};
  at::parallel_for(0, G, 1, [&](int64_t gbegin, int64_t gend) { bwd_groups<scalar_t, RMS>(args, gbegin, gend); });

  auto finish = [&](std::vector<acc_t>& part, at::Tensor& out) {
    std::vector<acc_t> total(N, acc_t(0));
    for (int64_t grp = 0; grp < G; ++grp) {
      const acc_t* p = part.data() + grp * N;
      for (int64_t j = 0; j < N; ++j) total[j] += p[j];
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

static at::Tensor affine_grad_out(const c10::optional<at::Tensor>& p, const at::Tensor& like, int64_t M) {
  if (!norm::present(p)) return norm::empty_none(like);
  // With no rows the gradient is zero (and no kernel writes it).
  return M == 0 ? at::zeros(p->sizes(), p->options()) : at::empty(p->sizes(), p->options());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_backward_cpu(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                             const at::Tensor& saved,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& rstd, bool saved_is_output) {
  const norm::Rows rows = norm::check_bwd(dy, dh, saved, weight, c10::nullopt, c10::nullopt, rstd, saved_is_output,
                                          /*layer_norm=*/false, /*allow_double=*/true);
  at::Tensor dx = norm::empty_like_x(saved);
  at::Tensor dweight = affine_grad_out(weight, saved, rows.M);
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
  at::Tensor dweight = affine_grad_out(weight, saved, rows.M);
  at::Tensor dbias = affine_grad_out(bias, saved, rows.M);
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
