#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "test_util.h"

using namespace diffpipe;

namespace {
// Writes a raw safetensors file: 8-byte length, header text, data bytes.
std::string raw_file(const std::string& name, const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  const std::string path = test::scratch_dir("safetensors-" + name) + "/f.safetensors";
  std::ofstream f(path, std::ios::binary);
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f << header;
  f << std::string(data_bytes, '\x01');
  return path;
}
std::string error_of(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Safetensors, RoundTripAllDtypesAndMetadata) {
  const std::string path = test::scratch_dir("safetensors-rt") + "/m.safetensors";
  std::map<std::string, at::Tensor> in = {
      {"f32", at::randn({3, 4})},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({2, 2}).to(at::kBFloat16)},
      {"i64", at::arange(7)},
      {"u8", at::full({2, 3}, 9, at::kByte)},
      {"bool", at::ones({4}, at::kBool)},
      {"empty", at::empty({0, 3})},
      {"scalar", at::scalar_tensor(2.5, at::kDouble)},
  };
  save_safetensors(path, in, {{"format", "pt"}});
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  auto out = load_safetensors(path);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [k, v] : in) {
    EXPECT_EQ(out.at(k).scalar_type(), v.scalar_type()) << k;
    EXPECT_TRUE(at::equal(out.at(k), v)) << k;
  }
}

TEST(Safetensors, ValidationErrorsNameFileAndTensor) {
  const std::string good = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(error_of(raw_file("good", good, 8)), "");
  auto expect = [](const std::string& err, const std::string& want) {
    EXPECT_NE(err.find(want), std::string::npos) << "error: " << err << "\nexpected: " << want;
    EXPECT_NE(err.find("f.safetensors"), std::string::npos) << err;
  };
  expect(error_of(raw_file("trunc", good, 4)), "tensor 'a': data_offsets end 8 past the data buffer (4 bytes)");
  expect(error_of(raw_file("hlen", good, 8, 1000)), "runs past the end of the file");
  expect(error_of(raw_file("huge", good, 8, 200000000)), "exceeds the limit");
  expect(error_of(raw_file("json", R"({"a":{"dtype":"F32",)", 8)), "not valid JSON");
  expect(error_of(raw_file("dtype", R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8)),
         "tensor 'a': unknown dtype 'F33'");
  expect(error_of(raw_file("size", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
         "tensor 'a': shape x dtype size is 12 bytes but data_offsets span 8");
  expect(error_of(raw_file("overlap",
                           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                           8)),
         "tensor 'b': data_offsets begin 4 but expected 8");
  expect(error_of(raw_file("gap", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
         "tensor 'a': data_offsets begin 4 but expected 0");
  expect(error_of(raw_file("cover", good, 12)), "tensors cover 8 bytes but the data buffer has 12");
  expect(error_of(raw_file("short", "", 0, 0) + "x"), "cannot open");
  auto f = SafetensorsFile::open(raw_file("get", good, 8));
  try {
    f->get("nope");
    FAIL() << "no error for a missing tensor";
  } catch (const Error& e) {
    expect(e.what(), "missing tensor 'nope'");
  }
}

TEST(Safetensors, TooShortFileIsRejected) {
  const std::string path = test::scratch_dir("safetensors-tiny") + "/f.safetensors";
  std::ofstream(path, std::ios::binary) << "abc";
  const std::string err = error_of(path);
  EXPECT_NE(err.find("need at least 8"), std::string::npos) << err;
}
