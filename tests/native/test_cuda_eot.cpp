// The fused EOT step CUDA kernels (fastdiv/csrc/cuda/eot.cu) run on the host by the emulation of
// fastdiv/csrc/cuda/emulate.h (FASTDIV_CUDA_EMULATE, set by CMakeLists.txt) and compared with the CPU kernel
// fastdiv::cpu::eot_step on the same inputs: every mode (l_inf / l2, with and without MI-FGSM momentum),
// every dtype, strided inputs, degenerate and NaN/Inf gradients. "Device" pointers are host pointers.
//
// Every emulated CUDA thread is a std::thread, so the cases keep B and D small: the whole file launches
// a few hundred blocks.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "emulation.h"
#include "harness.h"
// last: the emulation defines threadIdx, __shared__, ... as macros
#include "cuda/eot.cu"

namespace {

namespace cpu = fastdiv::cpu;
namespace fc = fastdiv::cuda;
using at::Tensor;
using native_test::all_finite;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

using native_test::acc_of;

// Tolerance of x_new relative to |x0| + |x_new| + |delta| (the rounding scale of x0 + delta): one
// storage ulp for half precision (a value within an fp32 ulp of a rounding boundary may round the other
// way), else the spread between the CPU's and the block's summation orders of the norms (fp32 partial
// sums of up to a few hundred terms, then double).
double out_rtol(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-13;
    case at::kFloat: return 1e-5;
    case at::kHalf: return 1.1 / 1024;  // ulp 2^-10 relative
    default: return 1.1 / 128;          // bf16: ulp 2^-7 relative
  }
}
double acc_rtol(at::ScalarType t) { return t == at::kDouble ? 1e-13 : 1e-5; }

// The raw bits of t (NaN payloads included), for exact comparisons.
Tensor bits(const Tensor& t) {
  const auto s = t.scalar_type();
  const auto as = s == at::kDouble ? at::kLong : (s == at::kFloat ? at::kInt : at::kShort);
  return t.contiguous().view(as);
}

bool same_bits(const Tensor& a, const Tensor& b) { return a.sizes() == b.sizes() && at::equal(bits(a), bits(b)); }

// values as a [rows..., cols] view of a larger NaN-filled tensor (row stride cols + pad): an element the
// kernel reads past D shows up as NaN.
Tensor padded(const Tensor& values, at::ScalarType dtype, int64_t pad) {
  auto shape = values.sizes().vec();
  const int64_t d = shape.back();
  shape.back() += pad;
  Tensor full = at::full(shape, kNaN, at::TensorOptions().dtype(dtype));
  Tensor view = full.narrow(-1, 0, d);
  view.copy_(values);
  return view;
}

struct Case {
  Tensor x, x0, g, alpha, eps;
  std::string norm = "linf";
  double lo = 0, hi = 1;
  bool clip = true;
  std::optional<Tensor> m;
  double decay = 1.0;
  std::string ctx;
};

// Gradient layouts: contiguous [B, n, D]; [n, B, D] transposed (the sample_dim=0 layout); a slice of a
// padded [B, n + 1, D + 4] tensor starting at row 1 (strides on B and n both larger than dense).
enum class Layout { kContiguous, kTransposed, kPadded };

Tensor make_grads(const Tensor& values64, at::ScalarType dtype, Layout layout) {
  const int64_t B = values64.size(0), n = values64.size(1), d = values64.size(2);
  switch (layout) {
    case Layout::kContiguous: return values64.to(dtype);
    case Layout::kTransposed: return values64.transpose(0, 1).contiguous().to(dtype).transpose(0, 1);
    case Layout::kPadded: {
      Tensor full = at::full({B, n + 1, d + 4}, kNaN, at::TensorOptions().dtype(dtype));
      Tensor view = full.narrow(1, 1, n).narrow(2, 0, d);
      view.copy_(values64);
      return view;
    }
  }
  return {};
}

// A random case: x0 in [0, 1], x = x0 + noise, standard normal gradients, per-example alpha / eps that
// differ per example (one of them 0), momentum of the size of g / ||g||_1 so both terms matter.
Case make_case(at::ScalarType dtype, int64_t B, int64_t n, int64_t d, const std::string& norm, bool with_m,
               double decay, Layout layout, bool strided_rows) {
  const auto acc = acc_of(dtype);
  Case c;
  c.norm = norm;
  c.decay = decay;
  const Tensor x0 = at::rand({B, d}, at::kDouble);
  const Tensor x = (x0 + 0.05 * at::randn({B, d}, at::kDouble)).clamp(0, 1);
  c.x0 = strided_rows ? padded(x0, dtype, 3) : x0.to(dtype);
  c.x = strided_rows ? padded(x, dtype, 5) : x.to(dtype);
  c.g = make_grads(at::randn({B, n, d}, at::kDouble), dtype, layout);
  // l_inf moves every feature by alpha; l2 moves the whole example by alpha
  // example 0: the step leaves the ball (projected); 1: mostly inside it (l2: entirely); 2: eps = 0;
  // 3: alpha = 0
  const std::vector<double> a = norm == "linf" ? std::vector<double>{0.05, 0.1, 0.03, 0.0}
                                               : std::vector<double>{0.5, 2.0, 1.0, 0.0};
  const std::vector<double> e = norm == "linf" ? std::vector<double>{0.02, 0.3, 0.0, 0.1}
                                               : std::vector<double>{0.4, 10.0, 0.0, 1.0};
  std::vector<double> av, ev;
  for (int64_t b = 0; b < B; ++b) {
    av.push_back(a[b % a.size()]);
    ev.push_back(e[b % e.size()]);
  }
  c.alpha = at::tensor(av, at::kDouble).to(acc);
  c.eps = at::tensor(ev, at::kDouble).to(acc);
  if (with_m) {
    const Tensor m = at::randn({B, d}, at::kDouble) / static_cast<double>(std::max<int64_t>(d, 1));
    c.m = strided_rows ? padded(m, acc, 2) : m.to(acc);
  }
  c.ctx = c10::str(dtype, " B=", B, " n=", n, " D=", d, " ", norm, with_m ? c10::str(" momentum decay=", decay) : "",
                   " layout=", static_cast<int>(layout), strided_rows ? " strided rows" : "");
  return c;
}

// The launcher called as the CUDA wrapper calls it (outputs and workspace prefilled with NaN bytes, so
// an element the kernel never writes fails the comparison).
std::tuple<Tensor, Tensor> run_emulated(const Case& c, cudaError_t* status = nullptr) {
  const int64_t B = c.g.size(0), n = c.g.size(1), d = c.g.size(2);
  const auto dtype = c.g.scalar_type();
  const bool has_m = c.m.has_value(), l2 = c.norm == "l2";
  Tensor out = at::full({B, d}, kNaN, at::TensorOptions().dtype(dtype));
  Tensor m_out = at::full({B, has_m ? d : 0}, kNaN, at::TensorOptions().dtype(acc_of(dtype)));
  const int64_t ws_bytes = fc::eot_step_workspace_bytes(native_test::cuda_dtype(dtype), B, d, l2, has_m);
  Tensor ws = at::full({ws_bytes}, 0xFF, at::TensorOptions().dtype(at::kByte));
  const fc::RowsView rows{c.g.const_data_ptr(), native_test::cuda_dtype(dtype), B, n, d, c.g.stride(0), c.g.stride(1)};
  const cudaError_t err = fc::eot_step(
      rows, c.x.const_data_ptr(), c.x.stride(0), c.x0.const_data_ptr(), c.x0.stride(0), c.alpha.const_data_ptr(),
      c.eps.const_data_ptr(), l2, c.lo, c.hi, c.clip, has_m ? c.m->const_data_ptr() : nullptr,
      has_m ? c.m->stride(0) : 0, c.decay, out.data_ptr(), has_m ? m_out.data_ptr() : nullptr,
      ws_bytes > 0 ? ws.data_ptr() : nullptr, nullptr);
  if (status) *status = err;
  EXPECT(err == cudaSuccess, c.ctx, ": launch status ", static_cast<int>(err));
  return {out, m_out};
}

std::tuple<Tensor, Tensor> run_cpu(const Case& c) {
  return cpu::eot_step(c.x, c.x0, c.g, c.alpha, c.eps, c.norm, c.lo, c.hi, c.clip, c.m, c.decay);
}

// got and ref have NaN at the same places and are within rtol * scale elsewhere (rtol 0: equal).
void expect_matches(const Tensor& got, const Tensor& ref, const Tensor& scale, double rtol, const std::string& ctx) {
  EXPECT(got.scalar_type() == ref.scalar_type() && got.sizes() == ref.sizes(), ctx, ": got ", got.sizes(), " of ",
         got.scalar_type(), ", expected ", ref.sizes(), " of ", ref.scalar_type());
  if (got.sizes() != ref.sizes()) return;
  const Tensor got_nan = got.isnan(), ref_nan = ref.isnan();
  EXPECT(at::equal(got_nan, ref_nan), ctx, ": NaN at ", got_nan.sum().item<int64_t>(), " places, the CPU at ",
         ref_nan.sum().item<int64_t>(), " (not the same places)");
  const Tensor keep = ~(got_nan | ref_nan);
  EXPECT_CLOSE(got.masked_select(keep), ref.masked_select(keep), scale.masked_select(keep), rtol, 0.0, ctx);
}

// Runs one case on both backends and compares x_new and m_new; returns the emulated outputs. l_inf
// without momentum involves no reduction over D, so there the outputs must be the CPU's bits.
std::tuple<Tensor, Tensor> check_case(const Case& c) {
  const std::vector<Tensor> inputs = {c.x, c.x0, c.g, c.alpha, c.eps};
  std::vector<Tensor> before;
  for (const auto& t : inputs) before.push_back(t.clone());
  const Tensor m_before = c.m ? c.m->clone() : Tensor();

  const auto [out, m_out] = run_emulated(c);
  const auto [ref, m_ref] = run_cpu(c);

  for (size_t i = 0; i < inputs.size(); ++i) EXPECT(same_bits(inputs[i], before[i]), c.ctx, ": input ", i, " modified");
  if (c.m) EXPECT(same_bits(*c.m, m_before), c.ctx, ": momentum modified");

  const bool exact = c.norm == "linf" && !c.m;
  const Tensor x064 = c.x0.to(at::kDouble), ref64 = ref.to(at::kDouble);
  const Tensor scale = x064.abs() + ref64.abs() + (ref64 - x064).abs();
  expect_matches(out, ref, scale, exact ? 0.0 : out_rtol(c.g.scalar_type()), c.ctx + " x_new");
  if (c.m) {
    const Tensor dm = c.decay * c.m->to(at::kDouble), mr = m_ref.to(at::kDouble);
    expect_matches(m_out, m_ref, mr.abs() + dm.abs() + (mr - dm).abs(), acc_rtol(c.g.scalar_type()),
                   c.ctx + " m_new");
  } else {
    EXPECT(m_out.numel() == 0 && m_ref.numel() == 0, c.ctx);
  }
  return {out, m_out};
}

// ----------------------------------------------------------------------------------------- tests

// Every dtype, norm and momentum mode, n = 1 / 2 / 10, D = 1 / 7 / 257, strided gradients and rows,
// per-example alpha / eps, clip to [0, 1], to a narrower box, or none.
TEST(eot_matches_cpu_all_modes) {
  int k = 0;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 2}, {7, 1}, {7, 10}, {257, 10}};  // (D, n)
  for (const auto dtype : kDtypes)
    for (const auto& [d, n] : shapes)
      for (const std::string norm : {"linf", "l2"})
        for (const bool with_m : {false, true}) {
          ++k;
          Case c = make_case(dtype, 3, n, d, norm, with_m, 0.9, static_cast<Layout>(k % 3), k % 2 == 0);
          c.clip = k % 3 != 2;
          if (k % 3 == 1) c.lo = 0.25, c.hi = 0.75;
          c.ctx += c.clip ? c10::str(" clip [", c.lo, ", ", c.hi, "]") : " no clip";
          check_case(c);
        }
}

// MI-FGSM momentum decays, including 0 (no memory) and > 1.
TEST(eot_momentum_decays) {
  for (const auto dtype : {at::kFloat, at::kDouble})
    for (const std::string norm : {"linf", "l2"})
      for (const double decay : {0.0, 0.5, 1.0, 1.7}) {
        Case c = make_case(dtype, 2, 3, 33, norm, true, decay, Layout::kTransposed, true);
        check_case(c);
      }
}

// D past a block of either kernel (256 columns per elementwise block, 1024 threads per example block),
// so blocks loop over columns. Half precision runs the elementwise kernel and the longest per-example
// path (l2 with momentum) only, to keep the emulation short.
TEST(eot_large_features) {
  for (const auto dtype : kDtypes)
    for (const std::string norm : {"linf", "l2"})
      for (const bool with_m : {false, true}) {
        const bool full_precision = dtype == at::kFloat || dtype == at::kDouble;
        if (!full_precision && (norm == "l2") != with_m) continue;
        Case c = make_case(dtype, 2, 3, 1500, norm, with_m, 0.9, Layout::kPadded, true);
        check_case(c);
      }
}

// B = 0 and D = 0 launch nothing and succeed, even with null pointers; the outputs have the CPU's shapes.
TEST(eot_empty) {
  for (const std::string norm : {"linf", "l2"})
    for (const bool with_m : {false, true})
      for (const auto& [B, d] : std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {3, 0}}) {
        Case c = make_case(at::kFloat, B, 2, d, norm, with_m, 0.9, Layout::kContiguous, false);
        const auto [out, m_out] = run_emulated(c);
        const auto [ref, m_ref] = run_cpu(c);
        EXPECT(out.sizes() == ref.sizes() && m_out.sizes() == m_ref.sizes(), c.ctx);
        const fc::RowsView rows{nullptr, fc::DType::kFloat32, B, 2, d, 0, 0};
        EXPECT(fc::eot_step(rows, nullptr, 0, nullptr, 0, nullptr, nullptr, norm == "l2", 0, 1, true, nullptr, 0, 1.0,
                            nullptr, nullptr, nullptr, nullptr) == cudaSuccess,
               c.ctx, ": null pointers");
      }
}

// An all-zero mean gradient has no direction: sign 0 (l_inf), a zero step (l2), no momentum update
// beyond decay m (||g||_1 = 0): finite everywhere. The other examples are random (eps = 0, alpha = 0).
TEST(eot_zero_gradient_is_finite) {
  for (const auto dtype : kDtypes)
    for (const std::string norm : {"linf", "l2"})
      for (const bool with_m : {false, true}) {
        Case c = make_case(dtype, 4, 2, 19, norm, with_m, 0.9, Layout::kContiguous, false);
        c.g.select(0, 1).zero_();
        // rows that cancel: a zero mean from non-zero samples
        c.g.select(0, 2).select(0, 1).copy_(-c.g.select(0, 2).select(0, 0));
        c.ctx += " zero mean gradients";
        const auto [out, m_out] = check_case(c);
        EXPECT(all_finite(out) && all_finite(m_out), c.ctx);
      }
}

// NaN gradients poison what the CPU kernel poisons: one feature for l_inf without momentum, the whole
// example once a norm over D sees it. An Inf gradient makes ||g|| infinite (a zero direction) and NaN
// only where Inf * 0 appears.
TEST(eot_nan_and_inf_match_cpu) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kDouble})
    for (const double bad : {kNaN, kInf})
      for (const std::string norm : {"linf", "l2"})
        for (const bool with_m : {false, true}) {
          Case c = make_case(dtype, 3, 3, 9, norm, with_m, 0.9, Layout::kPadded, true);
          c.g.select(0, 0).select(0, 1).select(0, 3).fill_(bad);
          c.g.select(0, 2).select(0, 0).select(0, 0).fill_(bad);
          c.ctx += c10::str(" grads with ", bad);
          const auto [out, m_out] = check_case(c);
          const int64_t nans = out.isnan().sum().item<int64_t>();
          if (std::isnan(bad)) {
            // l_inf without momentum: exactly the two poisoned features; else both examples entirely
            const int64_t expected = norm == "linf" && !with_m ? 2 : 2 * 9;
            EXPECT(nans == expected, c.ctx, ": ", nans, " NaN outputs, expected ", expected);
            EXPECT(all_finite(out.select(0, 1)), c.ctx, ": the clean example stays finite");
          } else if (norm == "linf" && !with_m) {
            EXPECT(nans == 0, c.ctx, ": an infinite mean has a sign");
          }
        }
}

// Two runs give the same bits (reductions in a fixed order, whatever the thread schedule).
TEST(eot_deterministic) {
  for (const std::string norm : {"linf", "l2"})
    for (const bool with_m : {false, true}) {
      const Case c = make_case(at::kFloat, 2, 4, 300, norm, with_m, 0.9, Layout::kTransposed, true);
      const auto [out1, m1] = run_emulated(c);
      const auto [out2, m2] = run_emulated(c);
      EXPECT(same_bits(out1, out2) && same_bits(m1, m2), c.ctx, ": two runs differ");
    }
}

// The launcher rejects what it cannot run without touching memory.
TEST(eot_invalid_arguments) {
  const Case c = make_case(at::kFloat, 2, 2, 8, "l2", false, 1.0, Layout::kContiguous, false);
  Tensor out = at::empty({2, 8});
  const fc::RowsView rows{c.g.const_data_ptr(), fc::DType::kFloat32, 2, 2, 8, c.g.stride(0), c.g.stride(1)};
  // l2 without momentum needs the workspace
  EXPECT(fc::eot_step(rows, c.x.const_data_ptr(), 8, c.x0.const_data_ptr(), 8, c.alpha.const_data_ptr(),
                      c.eps.const_data_ptr(), true, 0, 1, true, nullptr, 0, 1.0, out.data_ptr(), nullptr, nullptr,
                      nullptr) == cudaErrorInvalidValue,
         "missing workspace");
  // momentum without momentum_out
  const Tensor m = at::zeros({2, 8});
  EXPECT(fc::eot_step(rows, c.x.const_data_ptr(), 8, c.x0.const_data_ptr(), 8, c.alpha.const_data_ptr(),
                      c.eps.const_data_ptr(), false, 0, 1, true, m.const_data_ptr(), 8, 1.0, out.data_ptr(), nullptr,
                      nullptr, nullptr) == cudaErrorInvalidValue,
         "missing momentum_out");
  const fc::RowsView no_samples{c.g.const_data_ptr(), fc::DType::kFloat32, 2, 0, 8, 16, 8};
  EXPECT(fc::eot_step(no_samples, c.x.const_data_ptr(), 8, c.x0.const_data_ptr(), 8, c.alpha.const_data_ptr(),
                      c.eps.const_data_ptr(), false, 0, 1, true, nullptr, 0, 1.0, out.data_ptr(), nullptr, nullptr,
                      nullptr) == cudaErrorInvalidValue,
         "n = 0");
  EXPECT(fc::eot_step_workspace_bytes(fc::DType::kFloat16, 3, 5, true, false) == 3 * 5 * 4, "fp16: fp32 buffer");
  EXPECT(fc::eot_step_workspace_bytes(fc::DType::kFloat64, 3, 5, true, false) == 3 * 5 * 8, "fp64: fp64 buffer");
  EXPECT(fc::eot_step_workspace_bytes(fc::DType::kFloat32, 3, 5, true, true) == 0, "momentum_out is the buffer");
  EXPECT(fc::eot_step_workspace_bytes(fc::DType::kFloat32, 3, 5, false, false) == 0, "l_inf needs none");
}

}  // namespace

int main() { return native_test::run_all_tests(); }
