#include "heads.h"

#include <c10/util/Exception.h>

namespace fastdiv::cpu {

Head parse_head(const std::string& name) {
  if (name == "dpp") return Head::kDpp;
  if (name == "mean") return Head::kMeanCos;
  if (name == "kappa") return Head::kKappa;
  if (name == "max") return Head::kMaxCos;
  if (name == "smoothmax") return Head::kSmoothmax;
  if (name == "gal") return Head::kGal;
  if (name == "mean_penalty") return Head::kMeanPenalty;
  if (name == "sparsity") return Head::kSparsity;
  TORCH_CHECK_VALUE(false, "fastdiv: head must be one of dpp, mean, kappa, max, smoothmax, gal, ",
                    "mean_penalty, sparsity; got '", name, "'");
}

}  // namespace fastdiv::cpu
