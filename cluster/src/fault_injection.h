// Testing aid (--inject-failure STAGE:REQUEST[:crash]): makes one stage throw on one request, or abort the
// process there, so failure handling is tested end to end. Internal to the runner.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace diffpipe::runner {

struct Injection {
  std::string stage;  // empty: none
  uint64_t request = 0;
  bool crash = false;

  // Parses "STAGE:REQUEST[:crash]"; STAGE must be one of `stages`. Empty text = no injection.
  static Injection parse(const std::string& s, const std::vector<std::string>& stages);
  // Throws "injected failure" (or aborts the process) when (stage, request) is the injected one.
  void maybe_fire(const std::string& at_stage, uint64_t req, int rank) const;
};

}  // namespace diffpipe::runner
