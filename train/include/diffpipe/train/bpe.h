// Byte-pair-encoding training over a word list (CLIP style: the last symbol of a word carries "</w>").
// Used to build diffpipe's own tokenizer from the caption grammar, in vocab.json + merges.txt format, so the
// same ClipTokenizer loads it. Deterministic (ties broken by the pair's text).
#pragma once
#include <string>
#include <vector>

namespace diffpipe::data {

// Merges ("a b" lines) that turn every word (lower-case ASCII) into a single token.
std::vector<std::string> train_bpe(const std::vector<std::string>& words);

}  // namespace diffpipe::data
