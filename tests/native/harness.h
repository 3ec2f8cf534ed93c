// The tiny assertion harness of the native tests (no GoogleTest: no network in CI). Every TEST is a
// function; an EXPECT that fails prints file:line and marks the test failed; an exception escaping a
// test fails it. A test file defines its TESTs and `int main() { return run_all_tests(); }`.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace native_test {

using at::Tensor;

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

inline int g_failed_checks = 0;  // failed checks of the running test
inline const char* g_test = "";

inline void fail(const char* file, int line, const std::string& what) {
  ++g_failed_checks;
  if (g_failed_checks <= 20)  // keep a broken kernel from flooding the log
    std::cerr << file << ":" << line << ": FAILED [" << g_test << "] " << what << std::endl;
}

#define TEST(name)                                            \
  void name();                                                \
  const native_test::Register register_##name(#name, &name); \
  void name()

#define EXPECT(cond, ...)                                                               \
  do {                                                                                  \
    if (!(cond)) native_test::fail(__FILE__, __LINE__, c10::str("expected ", #cond, "; ", __VA_ARGS__)); \
  } while (0)

// stmt must throw c10::Error (or a subclass: ValueError, TypeError, NotImplementedError, ...).
#define EXPECT_THROWS(stmt, ...)                                                              \
  do {                                                                                        \
    bool thrown_ = false;                                                                     \
    try {                                                                                     \
      (void)(stmt);                                                                           \
    } catch (const c10::Error&) {                                                             \
      thrown_ = true;                                                                         \
    } catch (const std::exception& e) {                                                       \
      thrown_ = true;                                                                         \
      native_test::fail(__FILE__, __LINE__, c10::str(#stmt, " threw a non-c10::Error: ", e.what(), "; ", __VA_ARGS__)); \
    }                                                                                         \
    if (!thrown_) native_test::fail(__FILE__, __LINE__, c10::str(#stmt, " did not throw; ", __VA_ARGS__)); \
  } while (0)

// |actual - expected| <= rtol * scale + atol elementwise (all compared in float64). NaN anywhere in
// actual or expected fails. scale is usually |A| |B| for a product A B, so the bound is the rounding
// error of the computation rather than a guess relative to a possibly cancelled result.
inline bool close(const Tensor& actual, const Tensor& expected, const Tensor& scale, double rtol, double atol,
           std::string* why) {
  if (actual.sizes() != expected.sizes()) {
    *why = c10::str("shape ", actual.sizes(), " != expected ", expected.sizes());
    return false;
  }
  if (actual.numel() == 0) return true;
  const Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (!a.isfinite().all().item<bool>() || !e.isfinite().all().item<bool>()) {
    *why = "non-finite values";
    return false;
  }
  const Tensor err = (a - e).abs();
  const Tensor excess = err - (rtol * scale.to(at::kDouble).expand_as(err) + atol);
  const double worst = excess.max().item<double>();
  if (worst <= 0) return true;
  const int64_t at = excess.flatten().argmax().item<int64_t>();
  *why = c10::str("max |actual - expected| = ", err.max().item<double>(), "; worst element ", at,
                  ": actual ", a.flatten()[at].item<double>(), " expected ", e.flatten()[at].item<double>(),
                  " (rtol ", rtol, ", atol ", atol, ")");
  return false;
}

#define EXPECT_CLOSE(actual, expected, scale, rtol, atol, ...)                             \
  do {                                                                                     \
    std::string why_;                                                                      \
    if (!native_test::close((actual), (expected), (scale), (rtol), (atol), &why_))                      \
      native_test::fail(__FILE__, __LINE__, c10::str(#actual, " vs ", #expected, ": ", why_, "; ", __VA_ARGS__)); \
  } while (0)

inline bool all_finite(const Tensor& t) { return t.numel() == 0 || t.isfinite().all().item<bool>(); }


// ------------------------------------------------------------------ tolerances of the kernel tests

inline at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Relative rounding of sums of D terms in the accumulation type, against the sum of |terms|: the
// worst case D * u is 1e-4 at D = 1700 in fp32, the typical sqrt(D) * u far below it for all D here.
inline double acc_rtol(at::ScalarType t) { return t == at::kDouble ? 1e-12 : 1e-4; }
// Relative rounding of a value stored in dtype t after a few accumulation-type operations.
inline double out_rtol(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 2e-3;        // unit roundoff 2^-11
    case at::kBFloat16: return 1.6e-2;  // unit roundoff 2^-8
    default: return 0;
  }
}

// Runs every registered test; 0 when all passed (and there was at least one).
inline int run_all_tests() {
  // FASTDIV_TEST_SEED reruns the suite on other random inputs (the tolerances must hold for any).
  const char* seed = std::getenv("FASTDIV_TEST_SEED");
  at::manual_seed(seed ? std::strtoull(seed, nullptr, 10) : 0);
  // At least two threads even on a one-core machine, so the parallel_for paths really split.
  if (at::get_num_threads() < 2) at::set_num_threads(2);
  std::cout << "ATen threads: " << at::get_num_threads() << std::endl;
  int passed = 0, failed = 0;
  for (const auto& t : registry()) {
    g_test = t.name;
    g_failed_checks = 0;
    const auto start = std::chrono::steady_clock::now();
    try {
      t.fn();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, c10::str("unexpected exception: ", e.what()));
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (g_failed_checks == 0) {
      ++passed;
      std::cout << "[ OK ] " << t.name << " (" << seconds << " s)" << std::endl;
    } else {
      ++failed;
      std::cout << "[FAIL] " << t.name << " (" << g_failed_checks << " failed checks, " << seconds << " s)"
                << std::endl;
    }
  }
  std::cout << "native tests: " << passed << " passed, " << failed << " failed" << std::endl;
  return failed == 0 && passed > 0 ? 0 : 1;
}

}  // namespace native_test
