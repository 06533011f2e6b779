// Typed access to a JSON config file (config.json, scheduler_config.json, pipeline files).
// Owns: the parsed document and its path, so that every error names the file and the key.
// Thread-safety: immutable after load.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace diffpipe {

class JsonConfig {
 public:
  static JsonConfig load(const std::string& path);  // throws naming the file (missing, unreadable, bad JSON)
  JsonConfig(nlohmann::json j, std::string path) : j_(std::move(j)), path_(std::move(path)) {}

  const std::string& path() const { return path_; }
  const nlohmann::json& json() const { return j_; }
  bool has(const std::string& key) const;  // present and not null

  // Required keys: throw "<file>: key '<key>' ..." when absent or of the wrong type.
  int64_t integer(const std::string& key) const;
  double number(const std::string& key) const;
  bool boolean(const std::string& key) const;
  std::string string(const std::string& key) const;
  std::vector<int64_t> int_list(const std::string& key) const;
  std::vector<std::string> string_list(const std::string& key) const;

  // Optional keys: the default when absent or null.
  int64_t integer(const std::string& key, int64_t def) const;
  double number(const std::string& key, double def) const;
  bool boolean(const std::string& key, bool def) const;
  std::string string(const std::string& key, const std::string& def) const;
  // An int or a list of ints, broadcast to n entries (diffusers' attention_head_dim, transformer_layers_per_block).
  std::vector<int64_t> int_or_list(const std::string& key, size_t n, int64_t def) const;

  [[noreturn]] void fail(const std::string& key, const std::string& why) const;
  // Range checks on values already read, naming the file and key: integers >= lo; finite numbers > 0.
  void at_least(const std::string& key, int64_t value, int64_t lo) const;
  void at_least(const std::string& key, const std::vector<int64_t>& values, int64_t lo) const;
  void positive(const std::string& key, double value) const;
  // A key this implementation supports only with one value: absent, or exactly `allowed` (else an error naming it).
  void require(const std::string& key, const nlohmann::json& allowed) const;
  void finite(const std::string& key, double value) const;

 private:
  const nlohmann::json& at(const std::string& key) const;
  nlohmann::json j_;
  std::string path_;
};

// Reads a whole text file; throws naming the file.
std::string read_text_file(const std::string& path);
bool file_exists(const std::string& path);
bool dir_exists(const std::string& path);
std::string path_join(const std::string& a, const std::string& b);
// Creates `dir` and its parents; throws naming the folder when it cannot.
void make_dirs(const std::string& dir);

}  // namespace diffpipe
