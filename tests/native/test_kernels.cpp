// Native tests of the fastdiv CPU kernels (fastdiv/csrc/cpu) without Python: the ops are called directly
// through fastdiv::cpu::* and through the PyTorch dispatcher (proving the TORCH_LIBRARY registrations
// of fastdiv/csrc/ops.cpp run when the library is loaded). The oracle is plain ATen math in float64.
// Built and run by CMakeLists.txt (CTest), also under AddressSanitizer + UBSan in CI.
//
// The assertion harness is harness.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
// cpu::kTile (cpu/kernels.h): the column tile the kernels stream X in
#include "harness.h"

namespace {

namespace cpu = fastdiv::cpu;
using at::Tensor;
using native_test::acc_of;
using native_test::acc_rtol;
using native_test::all_finite;
using native_test::out_rtol;

// ----------------------------------------------------------------------------------- fixtures

constexpr double kEps = 1e-12;  // fastdiv.reference.EPS
constexpr double kJitter = 1e-4;  // fastdiv.reference.JITTER
constexpr double kRhoMax = 1.0 - 1e-6;  // fastdiv.reference.RHO_MAX

const std::vector<std::string> kHeads = {"dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty",
                                         "sparsity"};
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
// Feature sizes: tiny, past a 32-wide vector block, just past one and two 512-column blocks (513,
// 1031), and around the kernels' column tile kTile: one short of it, one past it, past two tiles.
const std::vector<int64_t> kDims = {1, 7, 33, 513, 1031, cpu::kTile - 1, cpu::kTile + 1, 2 * cpu::kTile + 7};

// Standard normal input, rounded to dtype (so x.to(kDouble) is exactly what the kernel reads).
Tensor randn_input(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

Tensor f64(const Tensor& t) { return t.to(at::kDouble); }

Tensor norms64(const Tensor& x) { return f64(x).square().sum(-1, /*keepdim=*/true).sqrt(); }

// 1 for rows above the norm floor, 0 for rows at or below it ([B, n, 1], float64).
Tensor active64(const Tensor& x) { return (norms64(x) > kEps).to(at::kDouble); }

// u = x / ||x|| per row in float64; rows with ||x|| <= eps have no direction, u = 0 (docs/design.md §2.1,
// reference.py).
Tensor unit_rows64(const Tensor& x) { return active64(x) * f64(x) / norms64(x).clamp_min(kEps); }


// The per-input loss of every head from the formulas of fastdiv/reference.py, in float64.
Tensor head_oracle(const Tensor& x, const std::string& head, double p = 0) {
  const Tensor u = unit_rows64(x);
  const Tensor C = at::bmm(u, u.transpose(1, 2));
  const int64_t n = x.size(1), D = x.size(2);
  const auto f64opt = at::TensorOptions().dtype(at::kDouble);
  const Tensor diag = at::eye(n, f64opt).to(at::kBool);
  const double inf = std::numeric_limits<double>::infinity();
  if (head == "dpp") return -at::logdet(C + kJitter * at::eye(n, f64opt));
  if (head == "mean") return C.masked_fill(diag, 0.0).sum(at::IntArrayRef{1, 2}) / double(n * (n - 1));
  if (head == "kappa") {
    const double pp = p > 0 ? p : double(D);
    const Tensor rho = u.mean(1).square().sum(-1).sqrt().clamp_max(kRhoMax);
    return rho * (pp - rho) / (1 - rho * rho) / pp;
  }
  if (head == "max") return C.masked_fill(diag, -inf).flatten(1).amax(1);
  if (head == "smoothmax") return C.masked_fill(diag, -inf).flatten(1).logsumexp(1);
  if (head == "gal") {
    const Tensor upper = at::ones({n, n}, at::TensorOptions().dtype(at::kBool)).triu(1);
    return C.masked_fill(upper.logical_not(), -inf).flatten(1).logsumexp(1);
  }
  if (head == "mean_penalty") return u.mean(1).square().sum(-1);
  if (head == "sparsity") return -u.abs().sum(-1).mean(1);
  TORCH_CHECK(false, "head_oracle: unknown head ", head);
}

// loss, A and beta of gram_loss, for inputs whose rows all keep the row scale 1 (checked)
std::tuple<Tensor, Tensor, Tensor> loss_of(const Tensor& x, const std::string& head, double p = 0) {
  const auto [loss, a, beta, row_scale] = cpu::gram_loss(x, head, kEps, kJitter, p, kRhoMax);
  EXPECT(row_scale.numel() == 0 || row_scale.eq(1).all().item<bool>(), "loss_of: a row was rescaled");
  return {loss, a, beta};
}

// --------------------------------------------------------------------------------------- gram

TEST(gram_matches_aten_all_dtypes) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : kDims)
      for (const int64_t n : {1, 3, 4, 5, 10}) {  // the Gram blocks columns j by 4
        const Tensor x = randn_input({3, n, D}, dtype);
        const Tensor x64 = f64(x);
        const auto [S, l1] = cpu::gram(x, /*with_l1=*/true);
        const auto ctx = c10::str(dtype, " n=", n, " D=", D);
        EXPECT(S.scalar_type() == acc_of(dtype) && l1.scalar_type() == acc_of(dtype), ctx);
        EXPECT(S.is_contiguous() && l1.is_contiguous(), ctx);
        const Tensor scale = at::bmm(x64.abs(), x64.abs().transpose(1, 2));
        EXPECT_CLOSE(S, at::bmm(x64, x64.transpose(1, 2)), scale, acc_rtol(dtype), 0.0, ctx);
        EXPECT(at::equal(S, S.transpose(1, 2)), "S not exactly symmetric; ", ctx);
        const Tensor l1_ref = x64.abs().sum(-1);
        EXPECT_CLOSE(l1, l1_ref, l1_ref, acc_rtol(dtype), 0.0, ctx);
        const auto [S2, l1_none] = cpu::gram(x, /*with_l1=*/false);
        EXPECT(at::equal(S2, S), ctx);
        EXPECT(l1_none.sizes() == at::IntArrayRef({3, 0}), "l1 without with_l1 is ", l1_none.sizes(), "; ", ctx);
      }
}

TEST(gram_pullback_matches_aten_all_dtypes) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : kDims)
      for (const int64_t n : {1, 4, 5, 7}) {  // the pullback blocks output rows by 4
        const int64_t B = 3;
        const Tensor x = randn_input({B, n, D}, dtype);
        const Tensor x64 = f64(x);
        const Tensor a = at::randn({B, n, n}, at::TensorOptions().dtype(acc_of(dtype)));
        const Tensor beta = at::randn({B, n}, at::TensorOptions().dtype(acc_of(dtype)));
        const auto ctx = c10::str(dtype, " n=", n, " D=", D);

        const Tensor dx = cpu::gram_pullback(x, a, beta);
        EXPECT(dx.scalar_type() == dtype && dx.sizes() == x.sizes() && dx.is_contiguous(), ctx);
        const Tensor ref = at::bmm(f64(a), x64) + f64(beta).unsqueeze(-1) * x64.sign();
        const Tensor scale = at::bmm(f64(a).abs(), x64.abs()) + f64(beta).abs().unsqueeze(-1);
        EXPECT_CLOSE(dx, ref, scale, out_rtol(dtype), 1e-7, ctx);

        // No beta: the l1 term is absent; an empty [B, 0] beta means the same.
        const Tensor dx_none = cpu::gram_pullback(x, a, std::nullopt);
        EXPECT_CLOSE(dx_none, at::bmm(f64(a), x64), at::bmm(f64(a).abs(), x64.abs()), out_rtol(dtype), 1e-7,
                     ctx);
        const Tensor empty_beta = at::empty({B, 0}, at::TensorOptions().dtype(acc_of(dtype)));
        EXPECT(at::equal(cpu::gram_pullback(x, a, empty_beta), dx_none), ctx);

        // A per-input scale s is the unscaled kernel on the coefficients a * s, beta * s, bit for bit,
        // whatever its stride: every other element of a buffer, or the stride-0 expansion autograd hands
        // out for loss.sum().backward().
        const auto acc_opts = at::TensorOptions().dtype(acc_of(dtype));
        const Tensor s = D % 2 ? at::randn({2 * B}, acc_opts).slice(0, 0, 2 * B, 2)
                               : at::full({1}, -1.5, acc_opts).expand({B});
        const Tensor s3 = s.unsqueeze(1).unsqueeze(2);
        EXPECT(at::equal(cpu::gram_pullback(x, a, beta, s), cpu::gram_pullback(x, a * s3, beta * s.unsqueeze(1))),
               "scale stride ", s.stride(0), "; ", ctx);
        EXPECT(at::equal(cpu::gram_pullback(x, a, std::nullopt, s), cpu::gram_pullback(x, a * s3, std::nullopt)),
               "scale, no beta; ", ctx);
      }
}

// NaN, Inf and 0 scales give what the unfused a * s, beta * s give, on the general path and on the
// diagonal-A fast path (where 0 * Inf off the diagonal must still reach the output as NaN).
TEST(gram_pullback_scale_special_values) {
  const auto nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const auto acc_opts = at::TensorOptions().dtype(acc_of(dtype));
    const Tensor x = randn_input({4, 5, 67}, dtype);
    const Tensor a = at::randn({4, 5, 5}, acc_opts), beta = at::randn({4, 5}, acc_opts);
    const Tensor s = at::tensor(std::vector<double>{nan, inf, 0.0, -2.0}, acc_opts);
    for (const Tensor& coef : {a, at::diag_embed(at::diagonal(a, 0, 1, 2))}) {
      const Tensor fused = cpu::gram_pullback(x, coef, beta, s);
      const Tensor unfused = cpu::gram_pullback(x, coef * s.view({4, 1, 1}), beta * s.view({4, 1}));
      const auto ctx = c10::str(dtype, coef.equal(a) ? " general" : " diagonal");
      EXPECT(at::equal(fused.isnan(), unfused.isnan()) && at::equal(fused.nan_to_num(0), unfused.nan_to_num(0)),
             ctx);
      EXPECT(fused[0].isnan().all().item<bool>() && fused[1].isnan().any().item<bool>(), "NaN / Inf scale; ", ctx);
      EXPECT(at::equal(fused[2], at::zeros_like(fused[2])) && all_finite(fused[3]), "0 / finite scale; ", ctx);
    }
  }
}

// -------------------------------------------------------------------------------------- heads

TEST(gram_loss_every_head_finite_symmetric_and_matches_aten) {
  struct Shape { int64_t B, n, D; };
  for (const auto dtype : kDtypes)
    for (const Shape s : {Shape{4, 5, 37}, Shape{2, 10, 513}, Shape{3, 2, 1031}, Shape{2, 7, cpu::kTile + 3}})
      for (const auto& head : kHeads) {
        const Tensor x = randn_input({s.B, s.n, s.D}, dtype);
        const auto ctx = c10::str(dtype, " head=", head, " B=", s.B, " n=", s.n, " D=", s.D);
        const auto [loss, A, beta] = loss_of(x, head);
        EXPECT(loss.sizes() == at::IntArrayRef({s.B}) && loss.scalar_type() == acc_of(dtype), ctx);
        EXPECT(A.sizes() == at::IntArrayRef({s.B, s.n, s.n}) && A.scalar_type() == acc_of(dtype), ctx);
        const int64_t beta_n = head == "sparsity" ? s.n : 0;
        EXPECT(beta.sizes() == at::IntArrayRef({s.B, beta_n}), "beta is ", beta.sizes(), "; ", ctx);
        EXPECT(all_finite(loss) && all_finite(A) && all_finite(beta), ctx);
        EXPECT(at::equal(A, A.transpose(1, 2)), "A not symmetric; ", ctx);
        // Losses are O(1) (dpp is O(n)); float accumulation of the Gram bounds the error.
        const Tensor ref = head_oracle(x, head);
        const double tol = dtype == at::kDouble ? 1e-9 : 2e-3;
        EXPECT_CLOSE(loss, ref, ref.abs() + 1, tol, 0.0, ctx);
      }
}

TEST(mean_head_is_mean_off_diagonal_cosine) {
  for (const auto dtype : {at::kDouble, at::kFloat})
    for (const int64_t D : {3, 64, 1031}) {
      const int64_t B = 6, n = 7;
      const Tensor x = randn_input({B, n, D}, dtype);
      const Tensor x64 = f64(x);
      // Pairwise cosines from ATen's own cosine_similarity (broadcast [B, n, 1, D] x [B, 1, n, D]).
      const Tensor cos = at::cosine_similarity(x64.unsqueeze(2), x64.unsqueeze(1), /*dim=*/-1);
      const Tensor off = at::ones({n, n}, at::TensorOptions().dtype(at::kDouble)) -
                         at::eye(n, at::TensorOptions().dtype(at::kDouble));
      const Tensor ref = (cos * off).sum(at::IntArrayRef{1, 2}) / double(n * (n - 1));
      const Tensor loss = std::get<0>(loss_of(x, "mean"));
      EXPECT_CLOSE(loss, ref, at::ones_like(ref), dtype == at::kDouble ? 1e-12 : 1e-5, 0.0, dtype, " D=", D);
    }
}

// Allowed |central difference - <grad, v>|: relative to the terms of <grad, v>, plus the rounding of
// the two function values divided by 2h (which dominates when the true derivative is ~0, e.g. D = 1,
// where every cosine is +-1 whatever the perturbation).
double fd_tolerance(const Tensor& grad, const Tensor& v, double f_plus, double f_minus, double h) {
  const double terms = (grad.abs() * v.abs()).sum().item<double>();
  const double rounding = 64 * std::numeric_limits<double>::epsilon() * (std::abs(f_plus) + std::abs(f_minus) + 1) / (2 * h);
  return 1e-6 * terms + rounding;
}

// The pullback coefficients are the gradient: d/dt sum_b L_b(x + t v) = <A X + beta sign(X), v>.
// Central differences in float64 (heads run in float64, so h = 1e-6 leaves ~1e-9 relative error).
TEST(gram_loss_coefficients_are_the_gradient) {
  struct Case { std::string head; double p; bool correlated; };
  std::vector<Case> cases;
  for (const auto& head : kHeads) cases.push_back({head, 0, false});
  for (const auto& head : kHeads) cases.push_back({head, 0, true});
  cases.push_back({"kappa", 5.0, true});
  for (const auto& c : cases)
    for (const int64_t D : {int64_t{1}, int64_t{9}, cpu::kTile + 3}) {
      const int64_t B = 3, n = 4;
      // At D = 1 every cosine is +-1 whatever the perturbation: max has ties, and for dpp the
      // difference quotient is pure rounding amplified by cond(C + jitter I) ~ n / jitter.
      if (D == 1 && (c.head == "max" || c.head == "dpp")) continue;
      Tensor x = randn_input({B, n, D}, at::kDouble);
      if (c.correlated) x = 0.3 * x + randn_input({B, 1, D}, at::kDouble);  // rho well above 0
      const Tensor v = randn_input({B, n, D}, at::kDouble);
      const auto [loss, A, beta] = loss_of(x, c.head, c.p);
      const Tensor grad = cpu::gram_pullback(x, A, beta);
      const double h = 1e-6;
      const double lp = std::get<0>(loss_of(x + h * v, c.head, c.p)).sum().item<double>();
      const double lm = std::get<0>(loss_of(x - h * v, c.head, c.p)).sum().item<double>();
      const double numeric = (lp - lm) / (2 * h);
      const double analytic = (grad * v).sum().item<double>();
      EXPECT(std::abs(numeric - analytic) <= fd_tolerance(grad, v, lp, lm, h), "head=", c.head, " p=", c.p, " correlated=",
             c.correlated, " D=", D, ": numeric ", numeric, " analytic ", analytic);
    }
}

// ------------------------------------------------------------------------- strides and shapes

// Every op on x must give bit-identical results to the op on x.contiguous() (the kernels read rows
// through strides; nothing depends on the layout).
void expect_layout_independent(const Tensor& x, const std::string& what) {
  const Tensor xc = x.contiguous();
  const auto ctx = c10::str(what, " ", x.scalar_type(), " sizes ", x.sizes(), " strides ", x.strides());
  {
    const auto [s, l1] = cpu::gram(x, true);
    const auto [sc, l1c] = cpu::gram(xc, true);
    EXPECT(at::equal(s, sc) && at::equal(l1, l1c), "gram; ", ctx);
  }
  for (const auto& head : kHeads) {
    const auto [l, a, b] = loss_of(x, head);
    const auto [lc, ac, bc] = loss_of(xc, head);
    EXPECT(at::equal(l, lc) && at::equal(a, ac) && at::equal(b, bc), "gram_loss ", head, "; ", ctx);
    EXPECT(at::equal(cpu::gram_pullback(x, a, b), cpu::gram_pullback(xc, ac, bc)), "gram_pullback ", head,
           "; ", ctx);
  }
  EXPECT(at::equal(cpu::concentration_stats(x, 2.0, kEps, kJitter, kRhoMax),
                   cpu::concentration_stats(xc, 2.0, kEps, kJitter, kRhoMax)),
         "concentration_stats; ", ctx);
  EXPECT(at::equal(cpu::normalize(x, kEps), cpu::normalize(xc, kEps)), "normalize; ", ctx);
  const Tensor g = at::randn(x.sizes(), x.options());
  EXPECT(at::equal(cpu::normalize_pullback(x, g, kEps), cpu::normalize_pullback(xc, g, kEps)),
         "normalize_pullback; ", ctx);
  const auto [r, m, var] = cpu::column_stats(x, kEps);
  const auto [rc, mc, varc] = cpu::column_stats(xc, kEps);
  EXPECT(at::equal(r, rc) && at::equal(m, mc) && at::equal(var, varc), "column_stats; ", ctx);
  const Tensor gr = at::randn_like(r), gm = at::randn_like(m), gv = at::randn_like(var);
  EXPECT(at::equal(cpu::column_stats_pullback(x, r, m, gr, gm, gv, kEps),
                   cpu::column_stats_pullback(xc, rc, mc, gr, gm, gv, kEps)),
         "column_stats_pullback; ", ctx);
}

TEST(strided_inputs_match_contiguous) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : {int64_t{1}, int64_t{33}, cpu::kTile + 1}) {
      const int64_t B = 5, n = 4;
      // [n, B, D] contiguous viewed as [B, n, D]: strides (D, B * D, 1).
      const Tensor nbd = randn_input({n, B, D}, dtype);
      const Tensor x = nbd.transpose(0, 1);
      EXPECT(!x.is_contiguous(), "setup");
      expect_layout_independent(x, "transpose(0, 1)");
      // A column slice of a wider tensor: row stride D + 9, storage offset 5.
      const Tensor wide = randn_input({B, n, D + 9}, dtype);
      expect_layout_independent(wide.narrow(2, 5, D), "narrow on D");
      // Every second input and a reversed-free step on n: strides (2 * n * D, 2 * D, 1).
      const Tensor big = randn_input({2 * B, 2 * n, D}, dtype);
      expect_layout_independent(big.slice(0, 0, 2 * B, 2).slice(1, 0, 2 * n, 2), "step 2 on B and n");
    }
  // Stride 0 on B and n (one row broadcast): every row is a duplicate.
  const Tensor row = randn_input({1, 1, 70}, at::kFloat);
  expect_layout_independent(row.expand({3, 4, 70}), "expand");
}

// Large batches split across threads (at::parallel_for chunks of batch_grain inputs): every output
// row must equal the op applied to that input alone.
TEST(parallel_batches_match_single_inputs) {
  const int64_t B = 37, n = 3, D = 2051;  // grain = 2^15 / (n D) = 5 inputs per chunk; 8 chunks
  const Tensor x = randn_input({B, n, D}, at::kFloat);
  const auto [s, l1] = cpu::gram(x, true);
  const auto [loss, a, beta] = loss_of(x, "sparsity");
  const Tensor dx = cpu::gram_pullback(x, a, beta);
  const Tensor stats = cpu::concentration_stats(x, 1.0, kEps, kJitter, kRhoMax);
  const Tensor u = cpu::normalize(x, kEps);
  const auto [r, m, v] = cpu::column_stats(x, kEps);
  const Tensor dxs = cpu::column_stats_pullback(x, r, m, r, m, v, kEps);
  for (int64_t b = 0; b < B; ++b) {
    const Tensor xb = x.narrow(0, b, 1);
    const auto [sb, l1b] = cpu::gram(xb, true);
    EXPECT(at::equal(s[b], sb[0]) && at::equal(l1[b], l1b[0]), "gram b=", b);
    const auto [lb, ab, betab] = loss_of(xb, "sparsity");
    EXPECT(at::equal(loss[b], lb[0]) && at::equal(a[b], ab[0]) && at::equal(beta[b], betab[0]), "loss b=", b);
    EXPECT(at::equal(dx[b], cpu::gram_pullback(xb, ab, betab)[0]), "pullback b=", b);
    EXPECT(at::equal(stats[b], cpu::concentration_stats(xb, 1.0, kEps, kJitter, kRhoMax)[0]), "stats b=", b);
    EXPECT(at::equal(u[b], cpu::normalize(xb, kEps)[0]), "normalize b=", b);
    const auto [rb, mb, vb] = cpu::column_stats(xb, kEps);
    EXPECT(at::equal(r[b], rb[0]) && at::equal(m[b], mb[0]) && at::equal(v[b], vb[0]), "column_stats b=", b);
    EXPECT(at::equal(dxs[b], cpu::column_stats_pullback(xb, rb, mb, rb, mb, vb, kEps)[0]), "cs pullback b=", b);
  }
}

TEST(empty_batch) {
  for (const auto dtype : kDtypes) {
    const int64_t n = 4, D = 513;
    const Tensor x = randn_input({0, n, D}, dtype);
    const auto acc_opts = at::TensorOptions().dtype(acc_of(dtype));
    const auto [s, l1] = cpu::gram(x, true);
    EXPECT(s.sizes() == at::IntArrayRef({0, n, n}) && l1.sizes() == at::IntArrayRef({0, n}), dtype);
    for (const auto& head : kHeads) {
      const auto [loss, a, beta] = loss_of(x, head);
      EXPECT(loss.sizes() == at::IntArrayRef({0}) && a.sizes() == at::IntArrayRef({0, n, n}), head, " ", dtype);
      EXPECT(beta.size(0) == 0, head);
    }
    const Tensor dx = cpu::gram_pullback(x, at::empty({0, n, n}, acc_opts), at::empty({0, n}, acc_opts));
    EXPECT(dx.sizes() == x.sizes(), dtype);
    EXPECT(cpu::concentration_stats(x, 1.0, kEps, kJitter, kRhoMax).sizes() == at::IntArrayRef({0, 6}), dtype);
    EXPECT(cpu::normalize(x, kEps).sizes() == x.sizes(), dtype);
    EXPECT(cpu::normalize_pullback(x, x, kEps).sizes() == x.sizes(), dtype);
    const auto [r, m, v] = cpu::column_stats(x, kEps);
    EXPECT(r.sizes() == at::IntArrayRef({0, n}) && m.sizes() == at::IntArrayRef({0, D}) &&
               v.sizes() == at::IntArrayRef({0, D}),
           dtype);
    EXPECT(cpu::column_stats_pullback(x, r, m, std::nullopt, m, v, kEps).sizes() == x.sizes(), dtype);
  }
  // n = 0 and D = 0 are legal for the Gram.
  const auto [s0, l0] = cpu::gram(at::zeros({2, 0, 5}), true);
  EXPECT(s0.sizes() == at::IntArrayRef({2, 0, 0}) && l0.sizes() == at::IntArrayRef({2, 0}), "n = 0");
  const auto [sd, ld] = cpu::gram(at::zeros({2, 3, 0}), true);
  EXPECT(at::equal(sd, at::zeros({2, 3, 3})) && at::equal(ld, at::zeros({2, 3})), "D = 0");
}

// ---------------------------------------------------------------------------- degenerate rows

// Rows at or below the norm floor have no direction (u = 0) and get exactly zero gradient from every op;
// duplicate rows (cosine exactly 1) must not break the Cholesky of R_DPP or the clamp of R_kappa.
TEST(zero_and_duplicate_rows_are_finite) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : {int64_t{1}, int64_t{40}, cpu::kTile + 1}) {
      const int64_t B = 4, n = 6;
      Tensor x64 = at::randn({B, n, D}, at::TensorOptions().dtype(at::kDouble));
      x64[0][0].zero_();                          // one zero row
      x64[0][3].copy_(x64[0][1]);                 // a duplicate row
      x64[1].zero_();                             // all rows zero
      x64[2].copy_(x64[2][0].expand({n, D}));     // all rows identical
      x64[3][2].copy_(x64[3][4] * 3.0);           // a positive multiple (cosine 1)
      x64[3][5].zero_();
      const Tensor x = x64.to(dtype);
      const auto ctx = c10::str(dtype, " D=", D);
      const auto [s, l1] = cpu::gram(x, true);
      EXPECT(all_finite(s) && all_finite(l1), ctx);
      for (const auto& head : kHeads) {
        const auto [loss, a, beta] = loss_of(x, head);
        EXPECT(all_finite(loss) && all_finite(a) && all_finite(beta), "head=", head, " ", ctx, " loss ",
               loss);
        EXPECT(at::equal(a, a.transpose(1, 2)), "A not symmetric; head=", head, " ", ctx);
        const Tensor dx = cpu::gram_pullback(x, a, beta);
        EXPECT(all_finite(dx), "pullback head=", head, " ", ctx);
        EXPECT(at::equal(dx[1], at::zeros_like(dx[1])) && at::equal(dx[0][0], at::zeros_like(dx[0][0])) &&
                   at::equal(dx[3][5], at::zeros_like(dx[3][5])),
               "zero rows get zero gradient; head=", head, " ", ctx);
        if (dtype == at::kDouble && !(head == "dpp" && D == 1)) {
          const Tensor ref = head_oracle(x, head);
          EXPECT_CLOSE(loss, ref, ref.abs() + 1, 1e-9, 0.0, "head=", head, " ", ctx);
        }
      }
      EXPECT(all_finite(cpu::concentration_stats(x, 2.0, kEps, kJitter, kRhoMax)), ctx);
      const Tensor u = cpu::normalize(x, kEps);
      EXPECT(all_finite(u) && at::equal(u[1], at::zeros_like(u[1])), "zero rows normalize to 0; ", ctx);
      const auto [r, m, v] = cpu::column_stats(x, kEps);
      EXPECT(all_finite(r) && all_finite(m) && all_finite(v), ctx);
      const Tensor du = cpu::normalize_pullback(x, at::randn(x.sizes(), x.options()), kEps);
      EXPECT(all_finite(du) && at::equal(du[1], at::zeros_like(du[1])), "normalize_pullback; ", ctx);
      const Tensor dc = cpu::column_stats_pullback(x, r, m, at::randn_like(r), at::randn_like(m),
                                                   at::randn_like(v), kEps);
      EXPECT(all_finite(dc) && at::equal(dc[1], at::zeros_like(dc[1])), "column_stats_pullback; ", ctx);
    }
}

// ----------------------------------------------------------------------- normalize and stats

TEST(normalize_matches_aten) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : kDims) {
      Tensor x = randn_input({3, 4, D}, dtype);
      x[1][2].zero_();
      const Tensor u = cpu::normalize(x, kEps);
      const auto ctx = c10::str(dtype, " D=", D);
      EXPECT(u.scalar_type() == dtype && u.sizes() == x.sizes(), ctx);
      const Tensor ref = unit_rows64(x);
      EXPECT_CLOSE(u, ref, ref.abs(), out_rtol(dtype) + acc_rtol(dtype), 1e-7, ctx);
    }
}

TEST(normalize_pullback_matches_aten) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : {int64_t{1}, int64_t{100}, cpu::kTile + 1}) {
      Tensor x = randn_input({3, 4, D}, dtype);
      x[2][1].zero_();
      const Tensor g = randn_input({3, 4, D}, dtype);
      const Tensor g64 = f64(g);
      const Tensor r = norms64(x).clamp_min(kEps);
      const Tensor u = unit_rows64(x), active = active64(x);
      // dL/dx = (g - <g, u> u) / r above the floor, 0 at or below it.
      const Tensor ref = active * (g64 - (g64 * u).sum(-1, true) * u) / r;
      const Tensor scale = active * (g64.abs() + (g64 * u).abs().sum(-1, true) * u.abs()) / r;
      EXPECT_CLOSE(cpu::normalize_pullback(x, g, kEps), ref, scale, out_rtol(dtype) + acc_rtol(dtype), 1e-7,
                   dtype, " D=", D);
    }
}

TEST(column_stats_matches_aten) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : kDims) {
      Tensor x = randn_input({3, 5, D}, dtype);
      x[0][4].zero_();
      const auto [r, mean, var] = cpu::column_stats(x, kEps);
      const auto ctx = c10::str(dtype, " D=", D);
      EXPECT(r.scalar_type() == acc_of(dtype) && mean.scalar_type() == acc_of(dtype), ctx);
      const Tensor x64 = f64(x);
      const Tensor r_ref = norms64(x).squeeze(-1);  // the norm itself, no floor
      const Tensor u = unit_rows64(x);
      const Tensor m_ref = u.mean(1);
      const Tensor v_ref = (u - m_ref.unsqueeze(1)).square().mean(1);  // population variance
      const double tol = 2 * acc_rtol(dtype);
      EXPECT_CLOSE(r, r_ref, r_ref, tol, 0.0, ctx);
      EXPECT_CLOSE(mean, m_ref, u.abs().mean(1), tol, 0.0, ctx);
      EXPECT_CLOSE(var, v_ref, (u.abs() + m_ref.abs().unsqueeze(1)).square().mean(1), tol, 0.0, ctx);
    }
}

// column_stats_pullback is the vector-Jacobian product of column_stats (float64 central differences),
// with any subset of the three output gradients.
TEST(column_stats_pullback_is_the_gradient) {
  const int64_t B = 2, n = 4;
  for (const int64_t D : {int64_t{1}, int64_t{17}, cpu::kTile + 3})
    for (int mask = 1; mask < 8; ++mask) {
      Tensor x = randn_input({B, n, D}, at::kDouble);
      const Tensor v = randn_input({B, n, D}, at::kDouble);
      const auto [r, m, var] = cpu::column_stats(x, kEps);
      const std::optional<Tensor> gr = (mask & 1) ? std::optional<Tensor>(at::randn_like(r)) : std::nullopt;
      const std::optional<Tensor> gm = (mask & 2) ? std::optional<Tensor>(at::randn_like(m)) : std::nullopt;
      const std::optional<Tensor> gv = (mask & 4) ? std::optional<Tensor>(at::randn_like(var)) : std::nullopt;
      auto objective = [&](const Tensor& xx) {
        const auto [r2, m2, v2] = cpu::column_stats(xx, kEps);
        double t = 0;
        if (gr) t += (r2 * *gr).sum().item<double>();
        if (gm) t += (m2 * *gm).sum().item<double>();
        if (gv) t += (v2 * *gv).sum().item<double>();
        return t;
      };
      const Tensor dx = cpu::column_stats_pullback(x, r, m, gr, gm, gv, kEps);
      const double h = 1e-6;
      const double numeric = (objective(x + h * v) - objective(x - h * v)) / (2 * h);
      const double analytic = (dx * v).sum().item<double>();
      EXPECT(std::abs(numeric - analytic) <= fd_tolerance(dx, v, objective(x + h * v), objective(x - h * v), h),
             "D=", D, " mask=", mask, ": numeric ", numeric,
             " analytic ", analytic);
      // Reduced precision agrees with float64 on the same (rounded) input.
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        const Tensor xl = x.to(dtype);
        const auto [rl, ml, vl] = cpu::column_stats(xl, kEps);
        auto cast = [&](const std::optional<Tensor>& g) {
          return g ? std::optional<Tensor>(g->to(at::kFloat)) : std::nullopt;
        };
        const Tensor dxl = cpu::column_stats_pullback(xl, rl, ml, cast(gr), cast(gm), cast(gv), kEps);
        const Tensor xr = f64(xl);
        const auto [r64, m64, v64] = cpu::column_stats(xr, kEps);
        const Tensor ref = cpu::column_stats_pullback(xr, r64, m64, gr, gm, gv, kEps);
        // Scale: dx = (G - <G, u> u) / r + g_r u with G = g_m / n + 2 g_v (u - m) / n; bound every
        // term by its magnitude.
        const Tensor u64 = xr / r64.unsqueeze(-1);
        Tensor g_abs = at::zeros_like(ref);
        if (gm) g_abs = g_abs + gm->abs().unsqueeze(1) / double(n);
        if (gv) g_abs = g_abs + gv->abs().unsqueeze(1) * 2.0 / double(n) * (u64.abs() + m64.abs().unsqueeze(1));
        Tensor scale_t = (g_abs + (g_abs * u64.abs()).sum(-1, true) * u64.abs()) / r64.unsqueeze(-1);
        if (gr) scale_t = scale_t + gr->abs().unsqueeze(-1) * u64.abs();
        EXPECT_CLOSE(dxl, ref, scale_t, out_rtol(dtype) + acc_rtol(dtype), 1e-7, dtype, " D=", D, " mask=",
                     mask);
      }
    }
}

TEST(concentration_stats_matches_aten) {
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto dtype : {at::kDouble, at::kFloat, at::kHalf})
    for (const int64_t D : {int64_t{7}, cpu::kTile + 1})
      for (const double q : {1.0, 2.0, 3.5, inf}) {
        const int64_t B = 3, n = 5;
        const Tensor x = (0.5 * at::randn({B, n, D}, at::TensorOptions().dtype(at::kDouble)) +
                          at::randn({B, 1, D}, at::TensorOptions().dtype(at::kDouble)))
                             .to(dtype);
        const Tensor out = cpu::concentration_stats(x, q, kEps, kJitter, kRhoMax);
        const auto ctx = c10::str(dtype, " D=", D, " q=", q);
        EXPECT(out.sizes() == at::IntArrayRef({B, 6}) && out.scalar_type() == acc_of(dtype), ctx);
        const Tensor u = unit_rows64(x);
        const Tensor mean = u.mean(1);
        const Tensor rho = mean.square().sum(-1).sqrt();
        const Tensor rho_q = std::isinf(q) ? mean.abs().amax(-1) : mean.abs().pow(q).sum(-1).pow(1.0 / q);
        const Tensor rc = rho.clamp_max(kRhoMax);
        const Tensor kappa = rc * (double(D) - rc) / (1 - rc * rc);
        const Tensor ref = at::stack({rho, rho_q, kappa, head_oracle(x, "mean"), head_oracle(x, "max"),
                                      head_oracle(x, "dpp")},
                                     1);
        const double tol = dtype == at::kDouble ? 1e-9 : 2e-3;
        EXPECT_CLOSE(out, ref, ref.abs() + 1, tol, 0.0, ctx);
      }
}

// --------------------------------------------------------------------------------- bad input

// The fused EOT step against the formulas of docs/design.md §2.6 in double, for both norms, with and without
// MI-FGSM momentum, per-example alpha/eps and a strided [B, n, D] view of [n, B, D] gradients.
// Rows whose squares leave the accumulation dtype's range (fp32: |x| ~ 1e19 overflows, ~1e-30 flushes
// to 0; fp64: 2^+-700) are rescaled by powers of two (head_math.h, "Row scaling"): every op gives the
// values of the same rows at scale 1, and the gram_loss pullback with its row scales the gradient at
// scale 1 divided by the scale. Batch element 1 has one row at scale 1 beside the scaled ones (the Gram
// losses scale it too); the Gram of the tiles past kTile goes through the same rare path.
TEST(rows_out_of_the_squares_range_give_the_unscaled_values) {
  struct Case {
    at::ScalarType dtype;
    double scale, rtol;
  };
  const double p700 = std::ldexp(1.0, 700);
  for (const Case c : {Case{at::kFloat, 1e19, 1e-4}, Case{at::kFloat, 1e-30, 1e-4}, Case{at::kFloat, 1e30, 1e-4},
                       Case{at::kBFloat16, 1e30, 2e-2}, Case{at::kDouble, p700, 1e-10},
                       Case{at::kDouble, 1 / p700, 1e-10}})
    for (const int64_t D : {int64_t{33}, cpu::kTile + 1}) {
      const Tensor base = randn_input({2, 5, D}, c.dtype);  // scale 1
      const Tensor x = (f64(base) * c.scale).to(c.dtype);
      Tensor xs = x.clone();  // batch element 1 mixes scaled rows and an unscaled one
      xs[1][0].copy_(base[1][0]);
      const double eps = c.scale < 1 ? 1e-300 : kEps;
      const auto ctx = c10::str(c.dtype, " scale=", c.scale, " D=", D);
      // The reference: the same data in fp64 for the narrower dtypes (fp64 squares hold theirs); for fp64
      // itself the rows at scale 1, whose losses are those of xs and whose gradients are xs's times the scale.
      const bool wide = c.dtype == at::kDouble;
      Tensor factor = at::full({2, 5, 1}, wide ? c.scale : 1.0, at::TensorOptions().dtype(at::kDouble));
      factor[1][0] = 1.0;
      const Tensor ref = wide ? f64(xs) / factor : f64(xs);
      const double rtol = wide ? 1e-10 : 1e-3;
      for (const auto& head : kHeads) {
        const auto [loss, a, beta, rs] = cpu::gram_loss(xs, head, eps, kJitter, 0.0, kRhoMax);
        const auto [l1, a1, b1, rs1] = cpu::gram_loss(ref, head, eps, kJitter, 0.0, kRhoMax);
        // every row of an input with a row out of range is scaled (head_math.h says why)
        EXPECT(rs.ne(1).all().item<bool>(), ctx, " ", head, ": row scales ", rs);
        EXPECT(rs1.eq(1).all().item<bool>(), ctx, " ", head, ": the reference's rows need no scale");
        EXPECT_CLOSE(loss, l1, l1.abs().clamp_min(1.0), rtol, 0.0, ctx, " ", head);
        const Tensor dx = cpu::gram_pullback(xs, a, beta.numel() ? std::optional<Tensor>(beta) : std::nullopt,
                                             std::nullopt, rs);
        const Tensor dx1 =
            cpu::gram_pullback(ref, a1, b1.numel() ? std::optional<Tensor>(b1) : std::nullopt) / factor;
        EXPECT(f64(dx).isfinite().all().item<bool>(), ctx, " ", head, ": non-finite gradient");
        EXPECT_CLOSE(dx, dx1, dx1.abs().amax({2}, true), wide ? rtol : std::max(rtol, c.rtol), 0.0, ctx, " ", head,
                     " gradient");  // dx is rounded to the input's dtype
      }
      const Tensor st = cpu::concentration_stats(xs, 2.0, eps, kJitter, kRhoMax);
      const Tensor st1 = cpu::concentration_stats(ref, 2.0, eps, kJitter, kRhoMax);
      EXPECT_CLOSE(st, st1, st1.abs().clamp_min(1.0), rtol, 0.0, ctx, " stats");
      // the row ops against the unit rows of base: u, its pullback, the column statistics
      const Tensor u = cpu::normalize(x, eps);
      const Tensor u_ref = unit_rows64(base);
      EXPECT_CLOSE(u, u_ref, u_ref.abs().amax({2}, true), c.rtol, 0.0, ctx, " normalize");
      const Tensor g = randn_input({2, 5, D}, c.dtype);
      const Tensor dxn = cpu::normalize_pullback(x, g, eps);
      const Tensor dxn_ref = cpu::normalize_pullback(f64(base), f64(g), eps) / c.scale;
      EXPECT_CLOSE(f64(dxn), dxn_ref, dxn_ref.abs().amax({2}, true), c.rtol, 0.0, ctx, " normalize_pullback");
      const auto [r, mean, var] = cpu::column_stats(x, eps);
      const auto [r1, mean1, var1] = cpu::column_stats(f64(base), eps);
      EXPECT_CLOSE(f64(r), f64(r1) * c.scale, f64(r1) * c.scale, c.rtol, 0.0, ctx, " r");
      EXPECT_CLOSE(mean, mean1, mean1.abs().amax({1}, true), c.rtol, 0.0, ctx, " mean");
      EXPECT_CLOSE(var, var1, var1.abs().amax({1}, true), c.rtol, 0.0, ctx, " var");
      // the gradients of the mean and variance of u scale with 1 / scale, that of r (u itself) does not
      const Tensor gr = at::randn_like(r1), gm = at::randn_like(mean1), gv = at::randn_like(var1);
      const auto acc = r.scalar_type();
      const Tensor dxs = cpu::column_stats_pullback(x, r, mean, std::nullopt, gm.to(acc), gv.to(acc), eps);
      const Tensor dxs_ref = cpu::column_stats_pullback(f64(base), r1, mean1, std::nullopt, gm, gv, eps) / c.scale;
      EXPECT_CLOSE(f64(dxs), dxs_ref, dxs_ref.abs().amax({2}, true), c.rtol, 0.0, ctx, " column_stats_pullback");
      const Tensor dxr = cpu::column_stats_pullback(x, r, mean, gr.to(acc), std::nullopt, std::nullopt, eps);
      const Tensor dxr_ref = cpu::column_stats_pullback(f64(base), r1, mean1, gr, std::nullopt, std::nullopt, eps);
      EXPECT_CLOSE(f64(dxr), dxr_ref, dxr_ref.abs().amax({2}, true), c.rtol, 0.0, ctx, " column_stats_pullback r");
    }
}

TEST(eot_step_matches_aten) {
  for (const auto dtype : kDtypes)
    for (const int64_t D : {int64_t{1}, int64_t{37}, cpu::kTile + 3})
      for (const std::string norm : {"linf", "l2"})
        for (const bool with_m : {false, true}) {
          const int64_t B = 3, n = 4;
          const auto ctx = c10::str(dtype, " D=", D, " ", norm, with_m ? " momentum" : "");
          const Tensor x0 = at::rand({B, D}, at::kDouble).to(dtype);
          const Tensor x = (x0.to(at::kDouble) + 0.01 * at::randn({B, D}, at::kDouble)).clamp(0, 1).to(dtype);
          const Tensor g = randn_input({n, B, D}, dtype).transpose(0, 1);  // strided [B, n, D]
          const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
          const Tensor alpha = at::tensor({0.01, 0.02, 0.0}, at::kDouble).to(acc);
          const Tensor eps = at::tensor({0.03, 0.005, 0.1}, at::kDouble).to(acc);
          const Tensor m0 = at::randn({B, D}, at::kDouble).to(acc);
          std::optional<Tensor> m;
          if (with_m) m = m0;
          const auto [x_new, m_new] = cpu::eot_step(x, x0, g, alpha, eps, norm, 0.0, 1.0, true, m, 0.9);

          // double-precision oracle
          const Tensor g64 = g.to(at::kDouble).mean(1);
          Tensor dir = g64;
          if (with_m) {
            const Tensor l1 = g64.abs().sum(1, true);
            const Tensor m_ref = 0.9 * m0.to(at::kDouble) + at::where(l1 > 0, g64 / l1, at::zeros_like(g64));
            EXPECT_CLOSE(m_new, m_ref, m_ref.abs(), acc_rtol(dtype) * 10, 1e-6, ctx);
            dir = m_ref;
          }
          const Tensor x64 = x.to(at::kDouble), x064 = x0.to(at::kDouble);
          Tensor delta;
          if (norm == "linf") {
            delta = (x64 + alpha.to(at::kDouble).unsqueeze(1) * dir.sign() - x064);
            delta = at::max(at::min(delta, eps.to(at::kDouble).unsqueeze(1)), -eps.to(at::kDouble).unsqueeze(1));
          } else {
            const Tensor dn = dir.norm(2, 1, true);
            const Tensor unit = at::where(dn > 0, dir / dn, at::zeros_like(dir));
            delta = x64 + alpha.to(at::kDouble).unsqueeze(1) * unit - x064;
            const Tensor len = delta.norm(2, 1, true);
            delta = delta * at::clamp_max(eps.to(at::kDouble).unsqueeze(1) / at::clamp_min(len, 1e-300), 1.0);
          }
          const Tensor ref = (x064 + delta).clamp(0, 1);
          EXPECT(x_new.scalar_type() == dtype && x_new.sizes() == x.sizes(), ctx);
          // half-precision outputs: a rounding step of x0 + delta may land one ulp away
          EXPECT_CLOSE(x_new, ref, at::ones_like(ref), out_rtol(dtype) * 4, 1e-9, ctx);
        }
}

TEST(bad_inputs_throw_c10_error) {
  const Tensor good = at::randn({2, 3, 8});
  const auto acc = at::TensorOptions().dtype(at::kFloat);
  EXPECT_THROWS(cpu::gram(at::randn({3, 8}), false), "2-D");
  EXPECT_THROWS(cpu::gram(at::randn({1, 2, 3, 8}), false), "4-D");
  EXPECT_THROWS(cpu::gram(at::ones({2, 3, 8}, at::TensorOptions().dtype(at::kInt)), false), "int");
  EXPECT_THROWS(cpu::gram(at::ones({2, 3, 8}, at::TensorOptions().dtype(at::kLong)), true), "long");
  EXPECT_THROWS(cpu::gram(at::randn({2, 8, 3}).transpose(1, 2), false), "stride on D");
  EXPECT_THROWS(cpu::gram(at::empty({2, 3, 8}, at::TensorOptions().device(at::kMeta)), false), "meta");
  EXPECT_THROWS(loss_of(good, "bogus"), "unknown head");
  EXPECT_THROWS(loss_of(good, ""), "empty head");
  EXPECT_THROWS(loss_of(good, "Mean"), "head names are case-sensitive");
  EXPECT_THROWS(loss_of(at::randn({2, 1, 8}), "mean"), "n = 1");
  EXPECT_THROWS(loss_of(at::randn({2, 8}), "mean"), "2-D");
  EXPECT_THROWS(loss_of(at::ones({2, 3, 8}, at::TensorOptions().dtype(at::kInt)), "mean"), "int");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 4}, acc), std::nullopt), "A shape");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, at::TensorOptions().dtype(at::kDouble)),
                                   std::nullopt),
                "A dtype");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, acc), at::randn({2, 4}, acc)), "beta shape");
  EXPECT_THROWS(cpu::gram_pullback(at::randn({6, 8}), at::randn({2, 3, 3}, acc), std::nullopt), "2-D");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, acc), std::nullopt, at::randn({3}, acc)),
                "scale shape");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, acc), std::nullopt, at::randn({2, 1}, acc)),
                "2-D scale");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, acc), std::nullopt,
                                   at::randn({2}, at::TensorOptions().dtype(at::kDouble))),
                "scale dtype");
  EXPECT_THROWS(cpu::gram_pullback(good, at::randn({2, 3, 3}, acc), std::nullopt, at::empty({0}, acc)),
                "empty scale");
  EXPECT_THROWS(cpu::concentration_stats(good, 0.5, kEps, kJitter, kRhoMax), "q < 1");
  EXPECT_THROWS(cpu::concentration_stats(at::randn({2, 1, 8}), 1.0, kEps, kJitter, kRhoMax), "n = 1");
  EXPECT_THROWS(cpu::normalize(at::randn({3, 8}), kEps), "2-D");
  EXPECT_THROWS(cpu::normalize(at::ones({2, 3, 8}, at::TensorOptions().dtype(at::kInt)), kEps), "int");
  EXPECT_THROWS(cpu::normalize_pullback(good, at::randn({2, 3, 7}), kEps), "grad shape");
  EXPECT_THROWS(cpu::normalize_pullback(good, at::randn({2, 3, 8}, at::TensorOptions().dtype(at::kDouble)),
                                        kEps),
                "grad dtype");
  EXPECT_THROWS(cpu::column_stats(at::randn({3, 8}), kEps), "2-D");
  const auto [r, m, v] = cpu::column_stats(good, kEps);
  EXPECT_THROWS(cpu::column_stats_pullback(good, r, m.narrow(1, 0, 7), std::nullopt, m, v, kEps), "mean shape");
  EXPECT_THROWS(cpu::column_stats_pullback(good, r, m, std::nullopt, m.to(at::kDouble), v, kEps),
                "grad_mean dtype");
}

// -------------------------------------------------------------------------------- dispatcher

const std::vector<std::string> kOps = {"gram", "gram_pullback", "gram_loss", "concentration_stats",
                                       "normalize", "normalize_pullback", "column_stats",
                                       "column_stats_pullback"};

TEST(ops_are_registered_with_cpu_kernels) {
  for (const auto& name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchema({"fastdiv::" + name, ""});
    EXPECT(op.has_value(), "fastdiv::", name, " has no schema (TORCH_LIBRARY did not run?)");
    if (op) EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "fastdiv::", name, " has no CPU kernel");
  }
}

TEST(dispatcher_calls_match_direct_calls) {
  const Tensor x = randn_input({3, 6, 517}, at::kFloat).transpose(0, 1).contiguous().transpose(0, 1);
  // Typed (unboxed) call; the signature must be the kernel's exactly (CppSignature is checked).
  const auto gram_loss_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastdiv::gram_loss", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::string&, double, double,
                                                            double, double)>();
  for (const auto& head : kHeads) {
    const auto [l, a, b, rs] = gram_loss_op.call(x, head, kEps, kJitter, 0.0, kRhoMax);
    const auto [ld, ad, bd] = loss_of(x, head);
    EXPECT(at::equal(l, ld) && at::equal(a, ad) && at::equal(b, bd), "typed gram_loss head=", head);
  }
  EXPECT_THROWS(gram_loss_op.call(x, "bogus", kEps, kJitter, 0.0, kRhoMax), "unknown head via dispatcher");
  EXPECT_THROWS(gram_loss_op.call(x.to(at::kInt), "mean", kEps, kJitter, 0.0, kRhoMax), "int via dispatcher");

  // Boxed call, as the Python side and torch.compile make it.
  const auto& gram_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiv::gram", "");
  std::vector<c10::IValue> stack{x, true};
  gram_op.callBoxed(&stack);
  EXPECT(stack.size() == 2, "gram returns 2 values, got ", stack.size());
  if (stack.size() == 2) {
    const auto [s, l1] = cpu::gram(x, true);
    EXPECT(at::equal(stack[0].toTensor(), s) && at::equal(stack[1].toTensor(), l1), "boxed gram");
  }

  const auto& pull_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiv::gram_pullback", "");
  const auto [l, a, b] = loss_of(x, "sparsity");
  // A boxed stack carries every argument, the defaulted Tensor? scale=None and row_scale=None included.
  std::vector<c10::IValue> pstack{x, a, b, c10::IValue(), c10::IValue()};
  pull_op.callBoxed(&pstack);
  EXPECT(pstack.size() == 1 && at::equal(pstack[0].toTensor(), cpu::gram_pullback(x, a, b)), "boxed pullback");
  std::vector<c10::IValue> nstack{x, a, c10::IValue(), c10::IValue(), c10::IValue()};  // Tensor? beta = None
  pull_op.callBoxed(&nstack);
  EXPECT(nstack.size() == 1 && at::equal(nstack[0].toTensor(), cpu::gram_pullback(x, a, std::nullopt)),
         "boxed pullback, beta None");
  const Tensor grad_loss = at::full({1}, 0.25, x.options()).expand({x.size(0)});  // stride 0, as from .sum()
  std::vector<c10::IValue> sstack{x, a, b, grad_loss, c10::IValue()};
  pull_op.callBoxed(&sstack);
  EXPECT(sstack.size() == 1 && at::equal(sstack[0].toTensor(), cpu::gram_pullback(x, a * 0.25, b * 0.25)),
         "boxed pullback, scale");
  const Tensor rows = at::full({x.size(0), x.size(1)}, 0.5, x.options());
  std::vector<c10::IValue> rstack{x, a, b, c10::IValue(), rows};
  pull_op.callBoxed(&rstack);
  EXPECT(rstack.size() == 1 && at::equal(rstack[0].toTensor(), cpu::gram_pullback(x, a * 0.5, b * 0.5)),
         "boxed pullback, row_scale");
  std::vector<c10::IValue> bad_stack{x, a, b, at::ones({x.size(0) + 1}, x.options()), c10::IValue()};
  EXPECT_THROWS(pull_op.callBoxed(&bad_stack), "bad scale via dispatcher");
  std::vector<c10::IValue> bad_rows{x, a, b, c10::IValue(), at::ones({x.size(0), x.size(1) + 1}, x.options())};
  EXPECT_THROWS(pull_op.callBoxed(&bad_rows), "bad row_scale via dispatcher");

  const auto& norm_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiv::normalize", "");
  std::vector<c10::IValue> ustack{x, kEps};
  norm_op.callBoxed(&ustack);
  EXPECT(ustack.size() == 1 && at::equal(ustack[0].toTensor(), cpu::normalize(x, kEps)), "boxed normalize");
}

}  // namespace

int main() { return native_test::run_all_tests(); }
