// The n x n Gram heads for the CPU kernels: the shared host/device math of fastdiv/csrc/head_math.h under the
// names the CPU kernels use, plus the parsing of the head names of the op schema.
#pragma once

#include <cstdint>
#include <string>

#include "head_math.h"

namespace fastdiv::cpu {

using heads::Head;
using HeadParams = heads::Params;
using heads::gram_statistics;
using heads::head_forward;
using heads::inverse_norms;
using heads::needs_resultant;

// Scratch doubles head_forward needs for n samples.
inline int64_t head_workspace(int64_t n) { return heads::workspace(n); }

// Parses the head name used in the op schema; throws c10::Error naming the valid names.
Head parse_head(const std::string& name);

}  // namespace fastdiv::cpu
