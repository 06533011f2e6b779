#include "fault_injection.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "diffpipe/runtime/error.h"

namespace diffpipe::runner {

Injection Injection::parse(const std::string& s, const std::vector<std::string>& stages) {
  Injection inj;
  if (s.empty()) return inj;
  const auto a = s.find(':');
  DP_CHECK(a != std::string::npos, "--inject-failure: expected STAGE:REQUEST[:crash], got '", s, "'");
  inj.stage = s.substr(0, a);
  std::string rest = s.substr(a + 1);
  const auto b = rest.find(':');
  if (b != std::string::npos) {
    DP_CHECK(rest.substr(b + 1) == "crash", "--inject-failure: the third part may only be 'crash'");
    inj.crash = true;
    rest = rest.substr(0, b);
  }
  std::string names;
  for (const auto& n : stages) names += (names.empty() ? "" : ", ") + n;
  DP_CHECK(std::count(stages.begin(), stages.end(), inj.stage), "--inject-failure: unknown stage '", inj.stage,
           "' (this pipeline: ", names, ")");
  DP_CHECK(!rest.empty() && rest.find_first_not_of("0123456789") == std::string::npos,
           "--inject-failure: REQUEST must be a request number, got '", rest, "'");
  inj.request = std::stoull(rest);
  return inj;
}

void Injection::maybe_fire(const std::string& at_stage, uint64_t req, int rank) const {
  if (stage.empty() || stage != at_stage || request != req) return;
  if (crash) {
    std::fprintf(stderr, "[diffpipe] rank %d: injected crash in stage %s on request %llu\n", rank, at_stage.c_str(),
                 static_cast<unsigned long long>(req));
    std::fflush(stderr);
    std::abort();
  }
  DP_FAIL("injected failure");
}

}  // namespace diffpipe::runner
