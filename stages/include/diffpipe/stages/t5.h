// T5's text side, as Imagen-style models (DeepFloyd IF) use it: the tokenizer (transformers' T5Tokenizer from its
// tokenizer.json: NFKC normalisation, whitespace split with SentencePiece's "▁" word marks, Unigram segmentation
// by the best total log-probability, </s> appended, <pad> to a fixed length) and T5EncoderModel on ATen (RMS layer
// norms, relative position buckets computed in the first layer and shared by all, unscaled attention, gated-GELU
// or ReLU feed forward). Thread-safety: immutable after load; encode() and forward() are const.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "diffpipe/stages/weights.h"

namespace diffpipe {

class T5Tokenizer {
 public:
  // dir: a folder with tokenizer.json (model type "Unigram"), or with SentencePiece's spiece.model alone (read as
  // transformers converts it); errors name the file and field.
  static T5Tokenizer load(const std::string& dir);
  struct Encoded {
    std::vector<int64_t> ids;   // max_length ids: the pieces (truncated to max_length - 1), </s>, then <pad>
    std::vector<int64_t> mask;  // 1 for the pieces and </s>, 0 for padding
  };
  Encoded encode(const std::string& text, int max_length = 77) const;
  std::vector<std::string> pieces(const std::string& text) const;  // the segmentation alone (no </s>)
  int64_t pad_id() const { return pad_id_; }
  int64_t eos_id() const { return eos_id_; }

 private:
  static T5Tokenizer load_spiece(const std::string& dir);
  // After vocab_ and added_ are read: the piece index, the unknown score, the special ids (errors name `file`).
  void index(const std::string& file);
  std::vector<int64_t> encode_word(const std::string& word) const;  // one "▁"-marked word -> ids
  std::vector<int64_t> encode_text(const std::string& text) const;  // normalised, split, segmented
  std::vector<std::pair<std::string, double>> vocab_;  // piece, log-probability
  std::map<std::string, int64_t> id_of_;
  std::vector<std::pair<std::string, int64_t>> added_;  // special tokens matched in the raw text, longest first
  size_t max_piece_bytes_ = 1;
  double unk_score_ = 0;
  int64_t unk_id_ = 2, pad_id_ = 0, eos_id_ = 1;
  bool nfkc_ = false;
};

struct T5Config {
  int64_t vocab_size = 32128, d_model = 512, d_kv = 64, d_ff = 2048, num_layers = 6, num_heads = 8;
  int64_t relative_attention_num_buckets = 32, relative_attention_max_distance = 128;
  double layer_norm_epsilon = 1e-6;
  bool gated = true;  // feed_forward_proj "gated-gelu" (T5 v1.1, IF's t5-v1_1-xxl); false: "relu" (T5 v1.0)
  static T5Config load(const std::string& config_json);  // rejects unsupported values, naming the key
};

class T5EncoderModel {
 public:
  T5EncoderModel(const T5Config& cfg, const Weights& w);
  static std::shared_ptr<T5EncoderModel> load(const std::string& dir, const DeviceSpec& spec);
  // input_ids, attention_mask: [B, L] int64 (mask: 1 = token, 0 = padding) -> last_hidden_state [B, L, d_model]
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) const;
  const T5Config& config() const { return cfg_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  T5Config cfg_;
};

// T5's bidirectional relative position bucket of (key position - query position) (exact below half the buckets
// of each sign, logarithmic up to max_distance). Exposed for tests.
int64_t t5_relative_bucket(int64_t relative_position, int64_t num_buckets, int64_t max_distance);

}  // namespace diffpipe
