// Op schemas of the fastdiv library and their CPU registrations. CUDA registrations live in
// fastdiv/csrc/cuda/ (CUDA builds only); fake (meta) kernels and autograd are registered from Python in
// fastdiv/ops/, so every op works under torch.compile.
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(fastdiv, m) {
  // x is [B, n, D] in every op: B inputs, n gradient samples each, D features (unit stride).
  m.def("gram(Tensor x, bool with_l1) -> (Tensor, Tensor)");
  // scale: the per-input upstream gradient, so a loss's backward is this one launch; row_scale: the
  // per-row factors of gram_loss's fourth output (rows rescaled to keep their squares in range).
  m.def("gram_pullback(Tensor x, Tensor a, Tensor? beta, Tensor? scale=None, Tensor? row_scale=None) -> Tensor");
  m.def(
      "gram_loss(Tensor x, str head, float eps, float jitter, float p, float rho_max) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("concentration_stats(Tensor x, float q, float eps, float jitter, float rho_max) -> Tensor");
  m.def("normalize(Tensor x, float eps) -> Tensor");
  m.def("normalize_pullback(Tensor x, Tensor grad, float eps) -> Tensor");
  m.def("column_stats(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "column_stats_pullback(Tensor x, Tensor r, Tensor mean, Tensor? grad_r, Tensor? grad_mean, "
      "Tensor? grad_var, float eps) -> Tensor");
  m.def("eot_step(Tensor x, Tensor x0, Tensor grads, Tensor alpha, Tensor eps, str norm, float lo, float hi, bool clip, Tensor? momentum, float decay) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiv, CPU, m) {
  namespace cpu = fastdiv::cpu;
  m.impl("gram", &cpu::gram);
  m.impl("gram_pullback", &cpu::gram_pullback);
  m.impl("gram_loss", &cpu::gram_loss);
  m.impl("concentration_stats", &cpu::concentration_stats);
  m.impl("normalize", &cpu::normalize);
  m.impl("normalize_pullback", &cpu::normalize_pullback);
  m.impl("column_stats", &cpu::column_stats);
  m.impl("column_stats_pullback", &cpu::column_stats_pullback);
  m.impl("eot_step", &cpu::eot_step);
}
