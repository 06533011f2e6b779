// CLIP byte-level BPE tokenizer loaded from a diffusers tokenizer/ folder (vocab.json + merges.txt +
// tokenizer_config.json). Follows the original CLIP tokenizer: html-unescape twice, collapse whitespace,
// lowercase, CLIP's split pattern with Unicode letter/number classes (ICU), byte-level BPE.
// Thread-safety: encode() is const and safe from any thread (the BPE cache is guarded by a mutex).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace diffpipe {

class ClipTokenizer {
 public:
  static ClipTokenizer load(const std::string& dir);  // throws naming the file

  // Token ids of `text` with start and end tokens, not truncated or padded.
  std::vector<int64_t> encode_untruncated(const std::string& text) const;
  // Exactly max_length ids: truncated to max_length-1 plus the end token, padded with pad_id().
  std::vector<int64_t> encode(const std::string& text) const;
  // How many of encode()'s ids are the text's (start and end included): the ones of CLIPTokenizer's attention mask.
  int64_t length(const std::string& text) const;

  // Textual inversion: `text` (matched in the normalised prompt, case-insensitively, anywhere, longest first; as
  // transformers' added tokens) becomes `ids`. A multi-vector token's name stands for all its ids.
  void add_token(const std::string& text, const std::vector<int64_t>& ids);
  bool has_token(const std::string& vocab_key) const { return vocab_.count(vocab_key) != 0; }
  // the vocabulary's size with the added tokens' ids (the text encoder's rows)
  int64_t total_ids() const { return static_cast<int64_t>(vocab_.size()) + added_ids_; }

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int max_length() const { return max_length_; }
  size_t vocab_size() const { return vocab_.size(); }

  // Text normalisation (public for tests): html-unescape twice, whitespace collapse + strip, lowercase.
  static std::string normalize(const std::string& text);
  static std::string html_unescape(const std::string& text);
  // One BPE merge: every occurrence of the adjacent pair (a, b) in `symbols`, left to right, becomes a + b.
  static std::vector<std::string> merge_pair(const std::vector<std::string>& symbols, const std::string& a,
                                             const std::string& b);
  // CLIP's pre-tokenizer split (after normalisation).
  static std::vector<std::string> split(const std::string& normalized);


 private:
  std::vector<std::string> bpe(const std::string& word) const;  // word: byte-unicode string; returns tokens
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<std::string, int> ranks_;  // "a b" -> merge rank
  std::vector<std::pair<std::string, std::vector<int64_t>>> added_;  // normalised text -> ids, longest text first
  int64_t added_ids_ = 0;
  // the ids of a normalised stretch of text without added tokens
  void encode_plain(const std::string& normalized, std::vector<int64_t>& ids) const;
  int64_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0;
  int max_length_ = 77;
  struct Cache {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<std::string>> words;
  };
  std::unique_ptr<Cache> cache_ = std::make_unique<Cache>();
};

}  // namespace diffpipe
