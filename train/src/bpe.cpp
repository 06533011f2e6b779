#include "diffpipe/train/bpe.h"

#include <map>

#include "diffpipe/stages/tokenizer.h"

namespace diffpipe::data {

std::vector<std::string> train_bpe(const std::vector<std::string>& words) {
  std::vector<std::vector<std::string>> seqs;
  for (const auto& w : words) {
    std::vector<std::string> s;
    for (char c : w) s.push_back(std::string(1, c));
    if (!s.empty()) s.back() += "</w>";
    seqs.push_back(s);
  }
  std::vector<std::string> merges;
  while (true) {
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const auto& s : seqs)
      for (size_t i = 0; i + 1 < s.size(); ++i) ++counts[{s[i], s[i + 1]}];
    if (counts.empty()) break;
    auto best = counts.begin();
    for (auto it = counts.begin(); it != counts.end(); ++it)
      if (it->second > best->second) best = it;  // ties: the first in text order (std::map order)
    const auto [a, b] = best->first;
    merges.push_back(a + " " + b);
    for (auto& s : seqs) s = ClipTokenizer::merge_pair(s, a, b);
  }
  return merges;
}

}  // namespace diffpipe::data
