// The Gram-family CUDA kernels (fastdiv/csrc/cuda/gram.cu) run on the host by the emulation of
// fastdiv/csrc/cuda/emulate.h (FASTDIV_CUDA_EMULATE, set by CMake), compared with the CPU kernels: the raw Gram,
// the fused losses (n <= 32, one launch) and the two-launch path (n > 32), the statistics and the
// pullback, for every dtype, strided inputs, degenerate rows, empty batches and bit-for-bit repeats.
// The heads themselves are the shared code of fastdiv/csrc/head_math.h, so any difference here is the Gram,
// the resultant pass or the plumbing.
#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "checks.h"  // parse_head
#include "cpu/kernels.h"
#include "cuda/gram.cu"
#include "emulation.h"
#include "harness.h"

namespace {

namespace cpu = fastdiv::cpu;
namespace cuda = fastdiv::cuda;
using at::Tensor;

constexpr double kEps = 1e-12, kJitter = 1e-4, kRhoMax = 1.0 - 1e-6;  // fastdiv.reference's defaults
const std::vector<std::string> kHeads = {"dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty",
                                         "sparsity"};
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

struct Shape {
  int64_t B, n, d;
};
// n: the smallest, odd, around one and two register blocks (8, 16), the fused limit (32) and past it
// (33, 40: two super blocks, the two-launch path). D: 1, odd, one tile and past one tile of columns.
const std::vector<Shape> kShapes = {{3, 2, 7},  {2, 3, 1},   {2, 10, 300}, {1, 17, 33},
                                    {1, 32, 70}, {2, 33, 40}, {1, 40, 600}};

at::TensorOptions acc_options(const Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// A [B, n, D] input whose rows are not contiguous: every other row of a wider buffer, padded columns.
Tensor strided_input(const Shape& s, at::ScalarType dtype) {
  return at::randn({s.B, 2 * s.n, s.d + 5}).to(dtype).slice(1, 0, 2 * s.n, 2).slice(2, 0, s.d);
}

// Relative rounding of a length-D sum in the accumulation type (the CPU and CUDA sums differ in order).
double sum_rtol(at::ScalarType t) { return t == at::kDouble ? 1e-12 : 2e-5; }

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         (a.nbytes() == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0);
}

std::tuple<Tensor, Tensor> cuda_gram(const Tensor& x, bool with_l1) {
  Tensor s = at::full({x.size(0), x.size(1), x.size(1)}, NAN, acc_options(x));
  Tensor l1 = at::full({x.size(0), with_l1 ? x.size(1) : 0}, NAN, acc_options(x));
  const cudaError_t err = cuda::gram(native_test::rows_view_of(x), s.data_ptr(), with_l1 ? l1.data_ptr() : nullptr, nullptr);
  EXPECT(err == cudaSuccess, "gram launch: ", static_cast<int>(err));
  return {s, l1};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_loss(const Tensor& x, const std::string& head, double p = 0,
                                                     double eps = kEps) {
  const int64_t B = x.size(0), n = x.size(1);
  const auto h = fastdiv::parse_head(head);
  Tensor loss = at::full({B}, NAN, acc_options(x));
  Tensor a = at::full({B, n, n}, NAN, acc_options(x));
  const int64_t beta_n = h == fastdiv::heads::Head::kSparsity ? n : 0;
  Tensor beta = at::full({B, beta_n}, NAN, acc_options(x));
  Tensor row_scale = at::full({B, n}, NAN, acc_options(x));
  std::vector<unsigned char> ws(cuda::gram_workspace_bytes(B, n));
  const cudaError_t err = cuda::gram_loss(native_test::rows_view_of(x), h, fastdiv::heads::Params{eps, kJitter, p, kRhoMax},
                                          loss.data_ptr(), a.data_ptr(), beta.numel() ? beta.data_ptr() : nullptr,
                                          row_scale.data_ptr(), ws.empty() ? nullptr : ws.data(), nullptr);
  EXPECT(err == cudaSuccess, "gram_loss launch: ", static_cast<int>(err));
  return {loss, a, beta, row_scale};
}

Tensor cuda_stats(const Tensor& x, double q, double eps = kEps) {
  Tensor out = at::full({x.size(0), 6}, NAN, acc_options(x));
  std::vector<unsigned char> ws(cuda::gram_workspace_bytes(x.size(0), x.size(1)));
  const cudaError_t err = cuda::concentration_stats(native_test::rows_view_of(x), q, fastdiv::heads::Params{eps, kJitter, 0.0, kRhoMax},
                                                    out.data_ptr(), ws.empty() ? nullptr : ws.data(), nullptr);
  EXPECT(err == cudaSuccess, "concentration_stats launch: ", static_cast<int>(err));
  return out;
}

Tensor cuda_pullback(const Tensor& x, const Tensor& a, const Tensor* beta, const Tensor* scale,
                     const Tensor* row_scale = nullptr) {
  Tensor dx = at::full(x.sizes(), NAN, x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaError_t err =
      cuda::gram_pullback(native_test::rows_view_of(x), a.data_ptr(), beta ? beta->data_ptr() : nullptr,
                          scale ? scale->data_ptr() : nullptr, scale ? scale->stride(0) : 0,
                          row_scale ? row_scale->data_ptr() : nullptr, dx.data_ptr(), nullptr);
  EXPECT(err == cudaSuccess, "pullback launch: ", static_cast<int>(err));
  return dx;
}

// Loss and coefficients against the CPU kernel's. The two compute the same head on Grams that differ
// by summation order only; the DPP head amplifies that by the condition number of C + jitter I, so the
// reduced-precision inputs use D >= 4 n (well conditioned) and a looser bound.
void expect_loss_matches_cpu(const Tensor& x, const std::string& head, const std::string& what, double eps = kEps) {
  const auto [loss, a, beta, row_scale] = cuda_loss(x, head, 0.0, eps);
  const auto [l_ref, a_ref, b_ref, rs_ref] = cpu::gram_loss(x, head, eps, kJitter, 0.0, kRhoMax);
  EXPECT(at::equal(row_scale, rs_ref), what, " row scales");
  const double rtol = x.scalar_type() == at::kDouble ? 1e-9 : 2e-3;
  const auto scale_of = [](const Tensor& t) {
    return t.numel() ? t.abs().max().clamp_min(1.0) : at::ones({}, t.options());
  };
  EXPECT_CLOSE(loss, l_ref, scale_of(l_ref), rtol, 0.0, what, " loss");
  EXPECT_CLOSE(a, a_ref, scale_of(a_ref), rtol, 0.0, what, " A");
  EXPECT_CLOSE(beta, b_ref, scale_of(b_ref), rtol, 0.0, what, " beta");
}

TEST(gram_matches_cpu) {
  for (const auto dtype : kDtypes)
    for (const auto& s : kShapes) {
      const Tensor x = at::randn({s.B, s.n, s.d}).to(dtype);
      const auto [S, l1] = cuda_gram(x, true);
      const auto [S_ref, l1_ref] = cpu::gram(x, true);
      const Tensor ax = x.to(at::kDouble).abs();
      const std::string what = c10::str(dtype, " ", s.B, "x", s.n, "x", s.d);
      EXPECT_CLOSE(S, S_ref, at::matmul(ax, ax.transpose(1, 2)), sum_rtol(dtype), 0.0, what, " S");
      EXPECT_CLOSE(l1, l1_ref, l1_ref.abs(), sum_rtol(dtype), 0.0, what, " l1");
      const auto [S_no, l1_no] = cuda_gram(x, false);
      EXPECT(same_bits(S_no, S), what, ": S does not depend on with_l1");
    }
}

TEST(fused_and_two_launch_losses_match_cpu_fp32_fp64) {
  for (const auto dtype : {at::kFloat, at::kDouble})
    for (const auto& s : kShapes) {
      if (dtype == at::kFloat && s.d < 4 * s.n) continue;  // see expect_loss_matches_cpu
      const Tensor x = at::randn({s.B, s.n, s.d}).to(dtype);
      for (const auto& head : kHeads)
        expect_loss_matches_cpu(x, head, c10::str(dtype, " ", head, " ", s.B, "x", s.n, "x", s.d));
    }
}

TEST(losses_match_cpu_half_precision) {
  for (const auto dtype : {at::kHalf, at::kBFloat16})
    for (const Shape s : {Shape{2, 10, 300}, Shape{1, 40, 600}})
      for (const std::string head : {"dpp", "kappa", "sparsity"}) {
        const Tensor x = at::randn({s.B, s.n, s.d}).to(dtype);
        expect_loss_matches_cpu(x, head, c10::str(dtype, " ", head, " n=", s.n));
      }
}

TEST(kappa_with_explicit_dimension) {
  const Tensor x = at::randn({2, 5, 64}, at::kDouble);
  const auto [loss, a, beta, rs] = cuda_loss(x, "kappa", 10.0);
  const auto [l_ref, a_ref, b_ref, rs_ref] = cpu::gram_loss(x, "kappa", kEps, kJitter, 10.0, kRhoMax);
  EXPECT_CLOSE(loss, l_ref, l_ref.abs(), 1e-9, 0.0, "kappa p=10");
}

TEST(concentration_stats_match_cpu) {
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16})
    for (const auto& s : {Shape{2, 10, 300}, Shape{3, 2, 7}, Shape{2, 33, 40}})
      for (const double q : {1.0, 2.0, 3.5, static_cast<double>(INFINITY)}) {
        if (dtype != at::kDouble && s.d < 4 * s.n) continue;
        const Tensor x = at::randn({s.B, s.n, s.d}).to(dtype);
        const Tensor st = cuda_stats(x, q);
        const Tensor ref = cpu::concentration_stats(x, q, kEps, kJitter, kRhoMax);
        const double rtol = dtype == at::kDouble ? 1e-9 : 2e-3;
        EXPECT_CLOSE(st, ref, ref.abs().clamp_min(1.0), rtol, 0.0, dtype, " q=", q, " n=", s.n);
      }
}

TEST(pullback_matches_cpu_with_beta_and_scale) {
  for (const auto dtype : kDtypes)
    for (const Shape s : {Shape{2, 3, 7}, Shape{2, 10, 300}, Shape{1, 17, 260}, Shape{1, 40, 33}, Shape{2, 70, 5}}) {
      const Tensor x = at::randn({s.B, s.n, s.d}).to(dtype);
      const Tensor a = at::randn({s.B, s.n, s.n}, acc_options(x));
      const Tensor beta = at::randn({s.B, s.n}, acc_options(x));
      const Tensor scale = at::randn({2 * s.B}, acc_options(x)).slice(0, 0, 2 * s.B, 2);  // stride 2
      const std::string what = c10::str(dtype, " ", s.B, "x", s.n, "x", s.d);
      const Tensor ax = x.to(at::kDouble).abs();
      const Tensor bound = at::matmul(a.to(at::kDouble).abs(), ax) + beta.to(at::kDouble).abs().unsqueeze(-1);
      const double rtol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 2e-5 : 1e-2;
      EXPECT_CLOSE(cuda_pullback(x, a, nullptr, nullptr), cpu::gram_pullback(x, a, std::nullopt), bound, rtol, 0.0,
                   what, " A X");
      EXPECT_CLOSE(cuda_pullback(x, a, &beta, nullptr), cpu::gram_pullback(x, a, beta), bound, rtol, 0.0, what,
                   " A X + beta sign X");
      const Tensor scaled_bound = bound * scale.to(at::kDouble).abs().view({s.B, 1, 1});
      EXPECT_CLOSE(cuda_pullback(x, a, &beta, &scale), cpu::gram_pullback(x, a, beta, scale), scaled_bound, rtol,
                   0.0, what, " scaled");
      const Tensor zero_stride = at::full({1}, 0.5, acc_options(x)).expand({s.B});
      EXPECT_CLOSE(cuda_pullback(x, a, &beta, &zero_stride), cpu::gram_pullback(x, a, beta, zero_stride), bound,
                   rtol, 0.0, what, " expanded scale");
    }
}

TEST(strided_inputs_match_contiguous) {
  for (const auto dtype : {at::kFloat, at::kHalf})
    for (const Shape s : {Shape{2, 10, 300}, Shape{1, 33, 40}}) {
      const Tensor x = strided_input(s, dtype);
      const Tensor xc = x.contiguous();
      const std::string what = c10::str(dtype, " n=", s.n);
      EXPECT(same_bits(std::get<0>(cuda_gram(x, true)), std::get<0>(cuda_gram(xc, true))), what, " gram");
      for (const std::string head : {"dpp", "kappa", "sparsity"}) {
        const auto [l, a, b, rs] = cuda_loss(x, head);
        const auto [lc, ac, bc, rsc] = cuda_loss(xc, head);
        EXPECT(same_bits(l, lc) && same_bits(a, ac) && same_bits(b, bc), what, " ", head);
      }
      const Tensor a = at::randn({s.B, s.n, s.n}, acc_options(x));
      EXPECT(same_bits(cuda_pullback(x, a, nullptr, nullptr), cuda_pullback(xc, a, nullptr, nullptr)), what,
             " pullback");
    }
}

TEST(repeated_calls_give_the_same_bits_and_leave_inputs_alone) {
  for (const Shape s : {Shape{2, 10, 300}, Shape{1, 40, 70}}) {
    const Tensor x = at::randn({s.B, s.n, s.d});
    const Tensor before = x.clone();
    for (const std::string head : {"dpp", "kappa"}) {
      const auto [l1, a1, b1, rs1] = cuda_loss(x, head);
      const auto [l2, a2, b2, rs2] = cuda_loss(x, head);
      EXPECT(same_bits(l1, l2) && same_bits(a1, a2), head, " n=", s.n);
      EXPECT(same_bits(cuda_pullback(x, a1, nullptr, nullptr), cuda_pullback(x, a1, nullptr, nullptr)), "pullback");
    }
    EXPECT(same_bits(cuda_stats(x, 2.0), cuda_stats(x, 2.0)), "stats n=", s.n);
    EXPECT(same_bits(x, before), "x was modified, n=", s.n);
  }
}

TEST(zero_duplicate_and_nan_rows) {
  for (const int64_t n : {5, 36}) {
    Tensor x = at::randn({3, n, 40}, at::kDouble);
    x[0][1].zero_();            // a row with no direction
    x[1][2].copy_(x[1][0]);     // duplicate rows: C has two equal rows, the DPP jitter keeps it finite
    x[2][0][3] = NAN;           // NaN propagates to that input only
    for (const auto& head : kHeads) {
      const auto [loss, a, beta, rs] = cuda_loss(x, head);
      const auto [l_ref, a_ref, b_ref, rs_ref] = cpu::gram_loss(x, head, kEps, kJitter, 0.0, kRhoMax);
      const std::string what = c10::str(head, " n=", n);
      EXPECT(at::equal(loss.isnan(), l_ref.isnan()) && at::equal(a.isnan(), a_ref.isnan()), what, " NaN pattern");
      EXPECT(loss.slice(0, 0, 2).isfinite().all().item<bool>(), what, ": zero/duplicate rows stay finite");
      EXPECT_CLOSE(loss.slice(0, 0, 2), l_ref.slice(0, 0, 2), l_ref.slice(0, 0, 2).abs().clamp_min(1.0), 1e-8, 0.0,
                   what);
    }
  }
}

// Rows whose squares leave fp32's range (|x| ~ 1e19 overflows, ~1e-30 flushes to 0) are rescaled by
// powers of two (head_math.h, "Row scaling"): the same row scales, losses, statistics and pullbacks as
// the CPU kernels, and the values of the same input in fp64, through the fused (n = 5) and the
// two-launch (n = 36) paths. Batch element 1 mixes scaled and unscaled rows.
TEST(rows_out_of_the_squares_range_match_cpu_and_fp64) {
  for (const int64_t n : {5, 36})
    for (const double scale : {1e19, 1e-30}) {
      const Tensor x64 = at::randn({2, n, 4 * n + 8}, at::kDouble);  // D >= 4 n: see expect_loss_matches_cpu
      Tensor x = (x64 * scale).to(at::kFloat);
      x[1][0].copy_(x64[1][0].to(at::kFloat));  // an unscaled row beside the scaled ones
      const Tensor xd = x.to(at::kDouble);      // the same values in fp64, no range problem there
      const double eps = scale < 1 ? 1e-45 : kEps;  // a floor below the tiny rows' norms
      const std::string what = c10::str("n=", n, " scale=", scale);
      for (const auto& head : kHeads) {
        const auto [loss, a, beta, rs] = cuda_loss(x, head, 0.0, eps);
        const auto [l_ref, a_ref, b_ref, rs_ref] = cpu::gram_loss(x, head, eps, kJitter, 0.0, kRhoMax);
        EXPECT(at::equal(rs, rs_ref), what, " ", head, ": row scales as on the CPU");
        EXPECT_CLOSE(loss, l_ref, l_ref.abs().clamp_min(1.0), 2e-3, 0.0, what, " ", head, " loss vs CPU");
        EXPECT_CLOSE(a, a_ref, a_ref.abs().max().clamp_min(1e-300), 2e-3, 0.0, what, " ", head, " A vs CPU");
        const auto [l64, a64, b64, rs64] = cpu::gram_loss(xd, head, eps, kJitter, 0.0, kRhoMax);
        EXPECT(rs.slice(0, 0, 1).ne(1).all().item<bool>(), what, " ", head, ": rows not rescaled");
        EXPECT_CLOSE(loss, l64, l64.abs().clamp_min(1.0), 2e-3, 0.0, what, " ", head, " loss vs fp64");
        // the pullback with the row scales is the fp64 gradient
        const Tensor* b = beta.numel() ? &beta : nullptr;
        const Tensor dx = cuda_pullback(x, a, b, nullptr, &rs);
        const Tensor dx64 = cpu::gram_pullback(xd, a64, b64.numel() ? std::optional<Tensor>(b64) : std::nullopt);
        EXPECT_CLOSE(dx, dx64, dx64.abs().amax({2}, true).clamp_min(1e-300), 2e-3, 0.0, what, " ", head,
                     " gradient vs fp64");
      }
      const Tensor st = cuda_stats(x, 2.0, eps);
      const Tensor st64 = cpu::concentration_stats(xd, 2.0, eps, kJitter, kRhoMax);
      EXPECT_CLOSE(st.slice(1, 0, 5), st64.slice(1, 0, 5), st64.slice(1, 0, 5).abs().clamp_min(1.0), 2e-3, 0.0,
                   what, " stats vs fp64");
    }
}

TEST(empty_inputs) {
  const Tensor x0 = at::randn({0, 4, 9});
  EXPECT(cuda::gram_loss(native_test::rows_view_of(x0), fastdiv::heads::Head::kDpp, fastdiv::heads::Params{kEps, kJitter, 0, kRhoMax},
                         nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) == cudaSuccess,
         "B = 0 launches nothing");
  EXPECT(cuda::gram_workspace_bytes(0, 40) == 0, "no workspace for B = 0");
  const Tensor xd = at::randn({2, 3, 0});  // D = 0: S = 0, every row below eps
  const auto [S, l1] = cuda_gram(xd, true);
  EXPECT(S.abs().max().item<double>() == 0 && l1.abs().max().item<double>() == 0, "D = 0 Gram is 0");
  const auto [loss, a, beta, rs] = cuda_loss(xd, "mean");
  const auto [l_ref, a_ref, b_ref, rs_ref] = cpu::gram_loss(xd, "mean", kEps, kJitter, 0.0, kRhoMax);
  EXPECT(at::equal(loss, l_ref) && at::equal(a, a_ref), "D = 0 mean head as on CPU");
  EXPECT(cuda_pullback(xd, a, nullptr, nullptr).numel() == 0, "D = 0 pullback is empty");
}

}  // namespace

int main() { return native_test::run_all_tests(); }
