// Emulated tests of the CUDA "rows" kernels (fastdiv/csrc/cuda/rows.cu: normalize, normalize_pullback,
// column_stats, column_stats_pullback). The .cu file is compiled here as host C++ with
// FASTDIV_CUDA_EMULATE (fastdiv/csrc/cuda/emulate.h: every CUDA thread is a std::thread, "device" pointers are
// host pointers); its launchers run on CPU tensors and are compared with the CPU kernels
// (fastdiv::cpu::*), whose own correctness test_kernels.cpp checks against ATen.
//
// The emulation starts one std::thread per CUDA thread, so every test keeps B small: the whole file
// launches a few hundred blocks.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "emulation.h"
#include "harness.h"
// Last: the emulation defines threadIdx, __shared__, ... as macros.
#include "cuda/rows.cu"

namespace {

namespace cpu = fastdiv::cpu;
namespace gpu = fastdiv::cuda;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr double kEps = 1e-12;  // fastdiv.reference.EPS
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

using native_test::acc_of;
using native_test::acc_rtol;
using native_test::out_rtol;
// Absolute slack for values stored in half precision near their subnormal range.
double out_atol(at::ScalarType t) { return t == at::kDouble ? 0.0 : 1e-7; }

Tensor randn_input(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

Tensor f64(const Tensor& t) { return t.to(at::kDouble); }

const void* ptr_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// ------------------------------------------------------------------- the launchers on host memory
// Outputs start as NaN, so an element a kernel never writes shows up as a NaN the CPU result lacks.

Tensor gpu_normalize(const Tensor& x, const std::string& ctx) {
  Tensor u = at::full(x.sizes(), kNaN, x.options());
  EXPECT(gpu::normalize(native_test::rows_view_of(x), kEps, u.data_ptr(), nullptr) == cudaSuccess, "normalize launch; ", ctx);
  return u;
}

Tensor gpu_normalize_pullback(const Tensor& x, const Tensor& g, const std::string& ctx) {
  Tensor dx = at::full(x.sizes(), kNaN, x.options());
  const Tensor gc = g.contiguous();
  EXPECT(gpu::normalize_pullback(native_test::rows_view_of(x), gc.data_ptr(), kEps, dx.data_ptr(), nullptr) == cudaSuccess,
         "normalize_pullback launch; ", ctx);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> gpu_column_stats(const Tensor& x, const std::string& ctx) {
  const auto opts = x.options().dtype(acc_of(x.scalar_type()));
  Tensor r = at::full({x.size(0), x.size(1)}, kNaN, opts);
  Tensor mean = at::full({x.size(0), x.size(2)}, kNaN, opts);
  Tensor var = at::full({x.size(0), x.size(2)}, kNaN, opts);
  EXPECT(gpu::column_stats(native_test::rows_view_of(x), kEps, r.data_ptr(), mean.data_ptr(), var.data_ptr(), nullptr) ==
             cudaSuccess,
         "column_stats launch; ", ctx);
  return {r, mean, var};
}

// r, mean and the gradients are contiguous acc tensors (as the CUDA wrapper passes them).
Tensor gpu_column_stats_pullback(const Tensor& x, const Tensor& r, const Tensor& mean, const OptTensor& gr,
                                 const OptTensor& gm, const OptTensor& gv, const std::string& ctx) {
  Tensor dx = at::full(x.sizes(), kNaN, x.options());
  EXPECT(gpu::column_stats_pullback(native_test::rows_view_of(x), r.data_ptr(), mean.data_ptr(), ptr_or_null(gr), ptr_or_null(gm),
                                    ptr_or_null(gv), kEps, dx.data_ptr(), nullptr) == cudaSuccess,
         "column_stats_pullback launch; ", ctx);
  return dx;
}

// ------------------------------------------------------------------------------ comparisons

// got and want agree in dtype, shape and NaN positions, and elsewhere |got - want| <= rtol scale + atol.
void expect_match(const Tensor& got, const Tensor& want, const Tensor& scale, double rtol, double atol,
                  const std::string& ctx) {
  EXPECT(got.scalar_type() == want.scalar_type(), "dtype ", got.scalar_type(), " != ", want.scalar_type(), "; ",
         ctx);
  EXPECT(got.sizes() == want.sizes(), "shape ", got.sizes(), " != ", want.sizes(), "; ", ctx);
  EXPECT(got.is_contiguous(), "not contiguous; ", ctx);
  if (got.sizes() != want.sizes() || got.numel() == 0) return;
  const Tensor nan_got = got.isnan(), nan_want = want.isnan();
  EXPECT(at::equal(nan_got, nan_want), "NaN positions differ (", nan_got.sum().item<int64_t>(), " vs ",
         nan_want.sum().item<int64_t>(), "); ", ctx);
  const Tensor skip = nan_got | nan_want;
  const Tensor s = f64(scale).expand(got.sizes());
  EXPECT_CLOSE(f64(got).masked_fill(skip, 0.0), f64(want).masked_fill(skip, 0.0),
               s.masked_fill(skip | s.isnan(), 0.0), rtol, atol, ctx);
}

// Row norms [B, n, 1] in float64, and whether each row is above the floor.
Tensor norms64(const Tensor& x) { return f64(x).square().sum(-1, /*keepdim=*/true).sqrt(); }
Tensor active64(const Tensor& x) { return (norms64(x) > kEps).to(at::kDouble); }
Tensor unit_rows64(const Tensor& x) { return active64(x) * f64(x) / norms64(x).clamp_min(kEps); }

// Each check_* runs one op on the "GPU" and on the CPU, compares, and returns the GPU result.

Tensor check_normalize(const Tensor& x, const std::string& ctx) {
  const Tensor got = gpu_normalize(x, ctx), want = cpu::normalize(x, kEps);
  const auto dtype = x.scalar_type();
  expect_match(got, want, f64(want).abs(), out_rtol(dtype) + acc_rtol(dtype), out_atol(dtype),
               c10::str("normalize; ", ctx));
  return got;
}

Tensor check_normalize_pullback(const Tensor& x, const Tensor& g, const std::string& ctx) {
  const Tensor got = gpu_normalize_pullback(x, g, ctx), want = cpu::normalize_pullback(x, g, kEps);
  const auto dtype = x.scalar_type();
  // dX = (g - <g, u> u) / r: bound every term by its magnitude.
  const Tensor g64 = f64(g), u = unit_rows64(x), r = norms64(x).clamp_min(kEps);
  const Tensor scale = active64(x) * (g64.abs() + (g64 * u).abs().sum(-1, true) * u.abs()) / r;
  expect_match(got, want, scale, out_rtol(dtype) + acc_rtol(dtype), out_atol(dtype),
               c10::str("normalize_pullback; ", ctx));
  return got;
}

std::tuple<Tensor, Tensor, Tensor> check_column_stats(const Tensor& x, const std::string& ctx) {
  const auto got = gpu_column_stats(x, ctx);
  const auto& [r, mean, var] = got;
  const auto [r_want, m_want, v_want] = cpu::column_stats(x, kEps);
  const double tol = 2 * acc_rtol(x.scalar_type());
  const Tensor u = unit_rows64(x);
  expect_match(r, r_want, f64(r_want).abs(), tol, 0.0, c10::str("column_stats r; ", ctx));
  expect_match(mean, m_want, u.abs().mean(1), tol, 0.0, c10::str("column_stats mean; ", ctx));
  expect_match(var, v_want, (u.abs() + f64(m_want).abs().unsqueeze(1)).square().mean(1), tol, 0.0,
               c10::str("column_stats var; ", ctx));
  return got;
}

// column_stats_pullback with column_stats' own r and mean (from the CPU: both pullbacks get the same
// inputs) and the given subset of output gradients.
Tensor check_column_stats_pullback(const Tensor& x, const OptTensor& gr, const OptTensor& gm, const OptTensor& gv,
                                   const std::string& ctx) {
  const auto [r, m, var] = cpu::column_stats(x, kEps);
  const Tensor want = cpu::column_stats_pullback(x, r, m, gr, gm, gv, kEps);
  const Tensor got = gpu_column_stats_pullback(x, r, m, gr, gm, gv, ctx);
  // dX = (G - <G, u> u) / r + g_r u with G = g_m / n + 2 g_v (u - m) / n: bound every term by its
  // magnitude (as test_kernels.cpp).
  const double n = static_cast<double>(x.size(1));
  const Tensor r64 = f64(r).unsqueeze(-1), active = (r64 > kEps).to(at::kDouble), rc = r64.clamp_min(kEps);
  const Tensor u = (active * f64(x) / rc).abs();
  Tensor g_abs = at::zeros_like(u);
  if (gm) g_abs = g_abs + f64(*gm).abs().unsqueeze(1) / n;
  if (gv) g_abs = g_abs + f64(*gv).abs().unsqueeze(1) * 2.0 / n * (u + f64(m).abs().unsqueeze(1));
  Tensor scale = active * (g_abs + (g_abs * u).sum(-1, true) * u) / rc;
  if (gr) scale = scale + f64(*gr).abs().unsqueeze(-1) * u;
  const auto dtype = x.scalar_type();
  expect_match(got, want, scale, out_rtol(dtype) + acc_rtol(dtype), out_atol(dtype),
               c10::str("column_stats_pullback; ", ctx));
  return got;
}

struct AllOps {
  Tensor u, du, r, mean, var, dx;
};

// All four ops on x with random output gradients.
AllOps check_all_ops(const Tensor& x, const std::string& ctx) {
  AllOps out;
  out.u = check_normalize(x, ctx);
  out.du = check_normalize_pullback(x, randn_input(x.sizes(), x.scalar_type()), ctx);
  std::tie(out.r, out.mean, out.var) = check_column_stats(x, ctx);
  const auto acc = at::TensorOptions().dtype(acc_of(x.scalar_type()));
  const int64_t B = x.size(0), n = x.size(1), D = x.size(2);
  out.dx = check_column_stats_pullback(x, at::randn({B, n}, acc), at::randn({B, D}, acc), at::randn({B, D}, acc),
                                       ctx);
  return out;
}

// ------------------------------------------------------------------------------------- tests
// The emulation costs ~0.1 ms per CUDA thread: the shapes are chosen to cover the code paths with few
// threads (a row kernel launches about rows x team threads, team = 32 for D <= 256, 64 to D = 512, ...).

TEST(all_ops_match_cpu_all_dtypes_and_shapes) {
  struct Case {
    int64_t B, n, D;
  };
  // Every dtype: n = 1, 2, 3, 10 and D = 1, 7, 33, 257 (a 64-thread team, two column blocks).
  const std::vector<Case> core = {{2, 1, 1}, {2, 2, 257}, {2, 3, 33}, {1, 10, 7}};
  // fp32 also: n = 17 and 33 (several blocks of four 32-thread teams, the last one partly past the
  // last row) and D = 1100 (a 256-thread team; five column blocks).
  const std::vector<Case> more = {{1, 17, 33}, {1, 33, 1}, {1, 2, 1100}};
  for (const auto dtype : kDtypes) {
    std::vector<Case> cases = core;
    if (dtype == at::kFloat) cases.insert(cases.end(), more.begin(), more.end());
    for (const Case c : cases) {
      Tensor x = randn_input({c.B, c.n, c.D}, dtype);
      if (c.n > 1) x[c.B - 1][c.n - 1].zero_();  // a row with no direction
      check_all_ops(x, c10::str(dtype, " B=", c.B, " n=", c.n, " D=", c.D));
    }
  }
}

// Every subset of grad_r, grad_mean, grad_var (absent = null pointer = zero).
TEST(column_stats_pullback_every_gradient_subset) {
  const int64_t B = 2, n = 3, D = 33;
  for (const auto dtype : kDtypes) {
    const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
    for (const int mask : half ? std::vector<int>{1, 2, 4} : std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}) {
      const Tensor x = randn_input({B, n, D}, dtype);
      const auto acc = at::TensorOptions().dtype(acc_of(dtype));
      const OptTensor gr = (mask & 1) ? OptTensor(at::randn({B, n}, acc)) : std::nullopt;
      const OptTensor gm = (mask & 2) ? OptTensor(at::randn({B, D}, acc)) : std::nullopt;
      const OptTensor gv = (mask & 4) ? OptTensor(at::randn({B, D}, acc)) : std::nullopt;
      const Tensor dx = check_column_stats_pullback(x, gr, gm, gv, c10::str(dtype, " mask=", mask));
      if (mask == 0) EXPECT(at::equal(dx, at::zeros_like(dx)), "no gradients give dX = 0; ", dtype);
    }
  }
}

// Rows of 1024-thread teams (one row per block). fp32, D = 7000: rows kept in shared memory (normalize
// 28 KB; normalize_pullback and column_stats_pullback 56 KB, above the default 48 KiB). fp64, D = 15000:
// normalize keeps 120 KB; the pullbacks' 240 KB do not fit, so they read their rows twice.
TEST(long_rows_kept_and_reread) {
  for (const auto& [dtype, D] : {std::pair{at::kFloat, int64_t{7000}}, std::pair{at::kDouble, int64_t{15000}}}) {
    const Tensor x = randn_input({1, 1, D}, dtype);
    const auto ctx = c10::str(dtype, " B=1 n=1 D=", D);
    check_normalize(x, ctx);
    check_normalize_pullback(x, randn_input(x.sizes(), dtype), ctx);
    const auto acc = at::TensorOptions().dtype(acc_of(dtype));
    check_column_stats_pullback(x, at::randn({1, 1}, acc), at::randn({1, D}, acc), at::randn({1, D}, acc), ctx);
  }
  // The row norms with a 1024-thread team (the column pass has one thread per column: keep D moderate).
  check_column_stats(randn_input({1, 2, 4100}, at::kFloat), "D=4100");
}

TEST(strided_inputs_match_cpu_and_contiguous) {
  const int64_t B = 2, n = 3;
  auto check = [&](const Tensor& x, const std::string& what) {
    const auto ctx = c10::str(what, " ", x.scalar_type(), " sizes ", x.sizes(), " strides ", x.strides());
    EXPECT(!x.is_contiguous(), "setup; ", ctx);
    const AllOps got = check_all_ops(x, ctx);
    // The kernels read x through its strides: the same bits as from a contiguous copy.
    const Tensor xc = x.contiguous();
    EXPECT(at::equal(got.u, gpu_normalize(xc, ctx)), "normalize; ", ctx);
    const auto [r, m, v] = gpu_column_stats(xc, ctx);
    EXPECT(at::equal(got.r, r) && at::equal(got.mean, m) && at::equal(got.var, v), "column_stats; ", ctx);
  };
  // [n, B, D] contiguous viewed as [B, n, D]: strides (D, B * D, 1).
  auto transposed = [&](int64_t D, at::ScalarType t) { return randn_input({n, B, D}, t).transpose(0, 1); };
  // A column slice of a wider tensor: row stride D + 9, storage offset 5.
  auto narrowed = [&](int64_t D, at::ScalarType t) { return randn_input({B, n, D + 9}, t).narrow(2, 5, D); };
  // Every second input and row: strides (4 n D, 2 D, 1).
  auto stepped = [&](int64_t D, at::ScalarType t) {
    return randn_input({2 * B, 2 * n, D}, t).slice(0, 0, 2 * B, 2).slice(1, 0, 2 * n, 2);
  };
  // Stride 0 on B and n: one row broadcast.
  auto expanded = [&](int64_t D, at::ScalarType t) { return randn_input({1, 1, D}, t).expand({B, n, D}); };
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    check(transposed(33, dtype), "transpose(0, 1)");
    check(narrowed(33, dtype), "narrow on D");
    check(stepped(33, dtype), "step 2 on B and n");
    check(expanded(33, dtype), "expand");
  }
  check(stepped(33, at::kDouble), "step 2 on B and n");
  check(transposed(33, at::kHalf), "transpose(0, 1)");
  check(transposed(257, at::kFloat), "transpose(0, 1)");
  check(narrowed(1, at::kFloat), "narrow on D");
}

// Rows at or below the norm floor have no direction: u = 0 and exactly zero gradient from every op;
// a NaN anywhere in a row makes that row's outputs (and its batch element's column statistics) NaN,
// at the same positions as on the CPU.
TEST(zero_tiny_and_nan_rows) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : {int64_t{1}, int64_t{40}}) {
      if (D == 1 && (dtype == at::kHalf || dtype == at::kBFloat16)) continue;
      const int64_t B = 3, n = 4;
      Tensor x64 = at::randn({B, n, D}, at::TensorOptions().dtype(at::kDouble));
      x64[0][0].zero_();        // a zero row
      x64[0][3].fill_(1e-16);   // a row below the floor (norm 1e-16 sqrt(D) <= 1e-12)
      x64[1].zero_();           // every row of an input zero
      x64[2][1][D - 1] = kNaN;  // a NaN in the last element of a row
      const Tensor x = x64.to(dtype);
      const auto ctx = c10::str(dtype, " D=", D);
      const AllOps got = check_all_ops(x, ctx);
      auto zero_rows = [](const Tensor& t) {
        return at::equal(t[1], at::zeros_like(t[1])) && at::equal(t[0][0], at::zeros_like(t[0][0])) &&
               at::equal(t[0][3], at::zeros_like(t[0][3]));
      };
      EXPECT(zero_rows(got.u), "rows below the floor normalize to 0; ", ctx);
      EXPECT(zero_rows(got.du), "normalize_pullback: zero gradient below the floor; ", ctx);
      EXPECT(zero_rows(got.dx), "column_stats_pullback: zero gradient below the floor; ", ctx);
      EXPECT(got.u[2][1].isnan().all().item<bool>() && !got.u[2][0].isnan().any().item<bool>(), "NaN row; ", ctx);
      EXPECT(at::equal(got.mean[1], at::zeros_like(got.mean[1])) && at::equal(got.var[1], at::zeros_like(got.var[1])),
             "an all-zero input has zero column statistics; ", ctx);
      EXPECT(got.mean[2].isnan().all().item<bool>() && got.var[2].isnan().all().item<bool>() &&
                 got.r[2][1].isnan().item<bool>() && !got.r[2][0].isnan().item<bool>(),
             "a NaN row reaches its input's statistics; ", ctx);
    }
}

// B = 0, n = 0 and D = 0. Nothing to compute launches nothing (null pointers are never touched); D = 0
// still has row norms (0) and n = 0 still has columns (0 / 0 = NaN, as on the CPU).
TEST(empty_sizes) {
  for (const auto dtype : kDtypes) {
    const auto ctx = c10::str(dtype);
    const Tensor empty_b = randn_input({0, 4, 33}, dtype);
    const gpu::RowsView v = native_test::rows_view_of(empty_b);
    EXPECT(gpu::normalize(v, kEps, nullptr, nullptr) == cudaSuccess, ctx);
    EXPECT(gpu::normalize_pullback(v, nullptr, kEps, nullptr, nullptr) == cudaSuccess, ctx);
    EXPECT(gpu::column_stats(v, kEps, nullptr, nullptr, nullptr, nullptr) == cudaSuccess, ctx);
    EXPECT(gpu::column_stats_pullback(v, nullptr, nullptr, nullptr, nullptr, nullptr, kEps, nullptr, nullptr) ==
               cudaSuccess,
           ctx);
    for (const auto& x : {randn_input({2, 3, 0}, dtype), randn_input({2, 0, 5}, dtype), empty_b}) {
      const auto xctx = c10::str(ctx, " sizes ", x.sizes());
      const Tensor none = at::zeros({});  // exact: no rounding to allow for
      expect_match(gpu_normalize(x, xctx), cpu::normalize(x, kEps), none, 0.0, 0.0, xctx);
      const Tensor g = randn_input(x.sizes(), dtype);
      expect_match(gpu_normalize_pullback(x, g, xctx), cpu::normalize_pullback(x, g, kEps), none, 0.0, 0.0, xctx);
      const auto [r, m, var] = gpu_column_stats(x, xctx);
      const auto [rw, mw, vw] = cpu::column_stats(x, kEps);
      expect_match(r, rw, none, 0.0, 0.0, c10::str("r; ", xctx));
      expect_match(m, mw, none, 0.0, 0.0, c10::str("mean; ", xctx));
      expect_match(var, vw, none, 0.0, 0.0, c10::str("var; ", xctx));
      const Tensor gr = at::randn_like(rw), gm = at::randn_like(mw), gv = at::randn_like(vw);
      expect_match(gpu_column_stats_pullback(x, rw, mw, gr, gm, gv, xctx),
                   cpu::column_stats_pullback(x, rw, mw, gr, gm, gv, kEps), none, 0.0, 0.0, xctx);
    }
  }
}

// Fixed-order reductions: a second run gives the same bits. No op writes to its inputs.
TEST(deterministic_and_inputs_untouched) {
  struct Case {
    at::ScalarType dtype;
    int64_t B, n, D;
  };
  // Warp teams, and 128-thread teams (a block-wide reduction).
  for (const Case c : {Case{at::kFloat, 2, 3, 33}, Case{at::kBFloat16, 2, 3, 33}, Case{at::kDouble, 1, 2, 600}}) {
    const auto ctx = c10::str(c.dtype, " B=", c.B, " n=", c.n, " D=", c.D);
    const Tensor x = randn_input({c.B, c.n, c.D}, c.dtype), g = randn_input({c.B, c.n, c.D}, c.dtype);
    const auto acc = at::TensorOptions().dtype(acc_of(c.dtype));
    const Tensor gr = at::randn({c.B, c.n}, acc), gm = at::randn({c.B, c.D}, acc), gv = at::randn({c.B, c.D}, acc);
    const auto [r, m, v] = cpu::column_stats(x, kEps);
    const Tensor x0 = x.clone(), g0 = g.clone(), r0 = r.clone(), m0 = m.clone(), gr0 = gr.clone(), gm0 = gm.clone(),
                 gv0 = gv.clone();

    EXPECT(at::equal(check_normalize(x, ctx), gpu_normalize(x, ctx)), "normalize; ", ctx);
    EXPECT(at::equal(check_normalize_pullback(x, g, ctx), gpu_normalize_pullback(x, g, ctx)),
           "normalize_pullback; ", ctx);
    const auto [r1, m1, v1] = check_column_stats(x, ctx);
    const auto [r2, m2, v2] = gpu_column_stats(x, ctx);
    EXPECT(at::equal(r1, r2) && at::equal(m1, m2) && at::equal(v1, v2), "column_stats; ", ctx);
    EXPECT(at::equal(check_column_stats_pullback(x, gr, gm, gv, ctx),
                     gpu_column_stats_pullback(x, r, m, gr, gm, gv, ctx)),
           "column_stats_pullback; ", ctx);

    EXPECT(at::equal(x, x0) && at::equal(g, g0), "x or grad modified; ", ctx);
    EXPECT(at::equal(r, r0) && at::equal(m, m0) && at::equal(gr, gr0) && at::equal(gm, gm0) && at::equal(gv, gv0),
           "column_stats_pullback inputs modified; ", ctx);
  }
}

// More rows than the column kernel stages inverse norms for at a time (kRowChunk): the kernel alone,
// on the CPU's norms (the row norms of 300 rows would cost ~10k emulated threads).
TEST(column_moments_in_chunks_of_rows) {
  static_assert(gpu::kRowChunk < 300 && 300 < 2 * gpu::kRowChunk, "two chunks, the second one partial");
  const int64_t B = 2, n = 300, D = 40;
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    Tensor x = randn_input({B, n, D}, dtype);
    x[1][gpu::kRowChunk + 5].zero_();  // in the second chunk
    const auto [r, m_want, v_want] = cpu::column_stats(x, kEps);
    const auto opts = at::TensorOptions().dtype(acc_of(dtype));
    Tensor mean = at::full({B, D}, kNaN, opts), var = at::full({B, D}, kNaN, opts);
    const gpu::RowsView v = native_test::rows_view_of(x);
    if (dtype == at::kFloat) {
      FASTDIV_LAUNCH(gpu::column_moments_kernel<float>, dim3(B), dim3(64), 0, nullptr, v, r.data_ptr<float>(), kEps,
                     int64_t{1}, mean.data_ptr<float>(), var.data_ptr<float>());
    } else {
      FASTDIV_LAUNCH(gpu::column_moments_kernel<double>, dim3(B), dim3(64), 0, nullptr, v, r.data_ptr<double>(),
                     kEps, int64_t{1}, mean.data_ptr<double>(), var.data_ptr<double>());
    }
    EXPECT(FASTDIV_LAST_ERROR() == cudaSuccess, dtype);
    const Tensor u = unit_rows64(x);
    const double tol = 2 * acc_rtol(dtype);
    expect_match(mean, m_want, u.abs().mean(1), tol, 0.0, c10::str("mean ", dtype));
    expect_match(var, v_want, (u.abs() + f64(m_want).abs().unsqueeze(1)).square().mean(1), tol, 0.0,
                 c10::str("var ", dtype));
  }
}

// n = 1: u is the row itself, so mean = u, var = 0 up to the rounding of u - mean, and the variance
// has no gradient (up to the same rounding).
TEST(single_sample) {
  for (const auto dtype : kDtypes) {
    const Tensor x = randn_input({2, 1, 70}, dtype);
    const auto ctx = c10::str(dtype);
    const auto [r, m, v] = check_column_stats(x, ctx);
    const double tiny = dtype == at::kDouble ? 1e-28 : 1e-12;  // (rounding of u)^2
    EXPECT(f64(v).abs().max().item<double>() <= tiny, "var of one sample is ", f64(v).abs().max().item<double>(),
           "; ", ctx);
    const Tensor u = gpu_normalize(x, ctx).squeeze(1);
    expect_match(m.to(dtype), u, f64(u).abs(), out_rtol(dtype), out_atol(dtype), c10::str("mean = u; ", ctx));
    const auto acc = at::TensorOptions().dtype(acc_of(dtype));
    const Tensor dv = gpu_column_stats_pullback(x, r, m, std::nullopt, std::nullopt, at::randn({2, 70}, acc), ctx);
    EXPECT(f64(dv).abs().max().item<double>() <= 10 * acc_rtol(dtype), "var pullback at n = 1; ", ctx);
  }
}

// Rows whose squares leave fp32's range (|x| ~ 1e19 overflows, ~1e-30 flushes to 0) take the rare path
// of head_math.h's "Row scaling", as on the CPU (whose results test_kernels.cpp checks against the
// unscaled rows). One row per input stays at scale 1. D = 40 puts four teams of 32 in a block, D = 300
// two teams of 64 (team reductions with barriers): a team whose row needs no rare path still takes part
// in the block's rare reductions, and keeps its own result.
TEST(rows_out_of_the_squares_range_match_cpu) {
  for (const double scale : {1e19, 1e-30, 1e30})
    for (const int64_t D : {int64_t{40}, int64_t{300}, int64_t{5000}}) {
      Tensor x = (randn_input({2, 3, D}, at::kDouble) * scale).to(at::kFloat);
      x[1][1].copy_(randn_input({D}, at::kFloat));
      const double eps = scale < 1 ? 1e-300 : kEps;
      const auto ctx = c10::str("scale=", scale, " D=", D);
      const double rtol = out_rtol(at::kFloat) + acc_rtol(at::kFloat);
      Tensor u = at::full(x.sizes(), kNaN, x.options());
      EXPECT(gpu::normalize(native_test::rows_view_of(x), eps, u.data_ptr(), nullptr) == cudaSuccess, ctx);
      const Tensor u_ref = cpu::normalize(x, eps);
      expect_match(u, u_ref, f64(u_ref).abs().amax({2}, true), rtol, 0.0, c10::str("normalize; ", ctx));
      EXPECT(f64(u).square().sum(-1).sub(1).abs().max().item<double>() < 1e-5, "normalize: unit rows; ", ctx);
      const Tensor g = randn_input({2, 3, D}, at::kFloat);
      Tensor dx = at::full(x.sizes(), kNaN, x.options());
      EXPECT(gpu::normalize_pullback(native_test::rows_view_of(x), g.data_ptr(), eps, dx.data_ptr(), nullptr) ==
                 cudaSuccess,
             ctx);
      const Tensor dx_ref = cpu::normalize_pullback(x, g, eps);
      expect_match(dx, dx_ref, f64(dx_ref).abs().amax({2}, true), rtol, 0.0, c10::str("normalize_pullback; ", ctx));
      const auto opts = x.options();
      Tensor r = at::full({2, 3}, kNaN, opts), mean = at::full({2, D}, kNaN, opts), var = at::full({2, D}, kNaN, opts);
      EXPECT(gpu::column_stats(native_test::rows_view_of(x), eps, r.data_ptr(), mean.data_ptr(), var.data_ptr(),
                               nullptr) == cudaSuccess,
             ctx);
      const auto [r_ref, m_ref, v_ref] = cpu::column_stats(x, eps);
      expect_match(r, r_ref, f64(r_ref).abs(), rtol, 0.0, c10::str("r; ", ctx));
      expect_match(mean, m_ref, f64(m_ref).abs().amax({1}, true), rtol, 0.0, c10::str("mean; ", ctx));
      expect_match(var, v_ref, f64(v_ref).abs().amax({1}, true), rtol, 0.0, c10::str("var; ", ctx));
      const Tensor gr = at::randn({2, 3}, opts), gm = at::randn({2, D}, opts), gv = at::randn({2, D}, opts);
      Tensor dxs = at::full(x.sizes(), kNaN, x.options());
      EXPECT(gpu::column_stats_pullback(native_test::rows_view_of(x), r_ref.data_ptr(), m_ref.data_ptr(),
                                        gr.data_ptr(), gm.data_ptr(), gv.data_ptr(), eps, dxs.data_ptr(),
                                        nullptr) == cudaSuccess,
             ctx);
      const Tensor dxs_ref = cpu::column_stats_pullback(x, r_ref, m_ref, gr, gm, gv, eps);
      expect_match(dxs, dxs_ref, f64(dxs_ref).abs().amax({2}, true), rtol, 0.0,
                   c10::str("column_stats_pullback; ", ctx));
    }
}

}  // namespace

int main() { return native_test::run_all_tests(); }
