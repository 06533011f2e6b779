#include "diffpipe/runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

namespace {
constexpr uint64_t kMaxHeader = 100000000;  // same bound as the reference loader

struct DTypeInfo {
  DType d;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},  {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8},        {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},  {DType::I8, "I8", 1},           {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1}, {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};
}  // namespace

const char* dtype_name(DType d) {
  for (const auto& i : kDTypes)
    if (i.d == d) return i.name;
  return "?";
}
size_t dtype_size(DType d) {
  for (const auto& i : kDTypes)
    if (i.d == d) return i.size;
  return 0;
}
bool parse_dtype(const std::string& s, DType* out) {
  for (const auto& i : kDTypes)
    if (s == i.name) {
      *out = i.d;
      return true;
    }
  return false;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  DP_CHECK(fd >= 0, path, ": cannot open safetensors file: ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    DP_FAIL(path, ": cannot stat: ", std::strerror(errno));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    DP_FAIL(path, ": not a safetensors file (", size, " bytes, need at least 8 for the header length)");
  }
  void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  DP_CHECK(m != MAP_FAILED, path, ": mmap failed: ", std::strerror(errno));
  f->map_ = m;
  f->map_size_ = size;
  const uint8_t* base = static_cast<const uint8_t*>(m);

  uint64_t n = 0;
  std::memcpy(&n, base, 8);  // little-endian host assumed (x86_64, aarch64)
  DP_CHECK(n <= kMaxHeader, path, ": header length ", n, " exceeds the limit of ", kMaxHeader);
  DP_CHECK(n <= size - 8, path, ": header length ", n, " runs past the end of the file (", size,
           " bytes): truncated file?");
  DP_CHECK(n > 0 && base[8] == '{', path, ": header is not a JSON object");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base + 8),
                                   reinterpret_cast<const char*>(base + 8 + n));
  } catch (const std::exception& e) {
    DP_FAIL(path, ": header is not valid JSON: ", e.what());
  }
  DP_CHECK(header.is_object(), path, ": header is not a JSON object");
  const uint8_t* data = base + 8 + n;
  const size_t data_len = size - 8 - n;

  struct Span {
    size_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      DP_CHECK(v.is_object(), path, ": __metadata__ must be an object of strings");
      for (auto m2 = v.begin(); m2 != v.end(); ++m2) {
        DP_CHECK(m2.value().is_string(), path, ": __metadata__ value '", m2.key(), "' is not a string");
        f->metadata_[m2.key()] = m2.value().get<std::string>();
      }
      continue;
    }
    DP_CHECK(v.is_object(), path, ": tensor '", name, "': entry is not an object");
    DP_CHECK(v.contains("dtype") && v["dtype"].is_string(), path, ": tensor '", name, "': missing dtype");
    DP_CHECK(v.contains("shape") && v["shape"].is_array(), path, ": tensor '", name, "': missing shape");
    DP_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2, path,
             ": tensor '", name, "': data_offsets must be [begin, end]");
    TensorView t;
    t.name = name;
    const std::string ds = v["dtype"].get<std::string>();
    DP_CHECK(parse_dtype(ds, &t.dtype), path, ": tensor '", name, "': unknown dtype '", ds, "'");
    uint64_t numel = 1;
    for (const auto& s : v["shape"]) {
      DP_CHECK(s.is_number_unsigned() || (s.is_number_integer() && s.get<int64_t>() >= 0), path, ": tensor '",
               name, "': shape entries must be non-negative integers");
      const uint64_t d = s.get<uint64_t>();
      DP_CHECK(d == 0 || numel <= UINT64_MAX / d, path, ": tensor '", name, "': shape overflows");
      numel *= d;
      t.shape.push_back(static_cast<int64_t>(d));
    }
    for (const auto& o : v["data_offsets"])
      DP_CHECK(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0), path, ": tensor '",
               name, "': data_offsets must be non-negative integers");
    const uint64_t b = v["data_offsets"][0].get<uint64_t>(), e = v["data_offsets"][1].get<uint64_t>();
    DP_CHECK(b <= e, path, ": tensor '", name, "': data_offsets begin ", b, " > end ", e);
    DP_CHECK(e <= data_len, path, ": tensor '", name, "': data_offsets end ", e, " past the data buffer (",
             data_len, " bytes): truncated file?");
    const uint64_t want = numel * dtype_size(t.dtype);
    DP_CHECK(want == e - b, path, ": tensor '", name, "': shape x dtype size is ", want, " bytes but data_offsets span ",
             e - b);
    t.data = data + b;
    t.nbytes = static_cast<size_t>(e - b);
    spans.push_back({static_cast<size_t>(b), static_cast<size_t>(e), name});
    f->tensors_.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  size_t expect = 0;
  for (const auto& s : spans) {
    DP_CHECK(s.begin == expect, path, ": tensor '", s.name, "': data_offsets begin ", s.begin, " but expected ",
             expect, " (offsets must be contiguous and non-overlapping)");
    expect = s.end;
  }
  DP_CHECK(expect == data_len, path, ": tensors cover ", expect, " bytes but the data buffer has ", data_len);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, map_size_);
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  DP_CHECK(it != tensors_.end(), path_, ": missing tensor '", name, "'");
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorBytes>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const TensorBytes*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });
  nlohmann::ordered_json h;
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    h["__metadata__"] = m;
  }
  size_t off = 0;
  for (const auto* t : order) {
    uint64_t numel = 1;
    for (auto s : t->shape) numel *= static_cast<uint64_t>(s);
    DP_CHECK(numel * dtype_size(t->dtype) == t->bytes.size(), path, ": tensor '", t->name, "': ", t->bytes.size(),
             " bytes do not match its shape and dtype");
    DP_CHECK(!h.contains(t->name), path, ": duplicate tensor '", t->name, "'");
    h[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {off, off + t->bytes.size()}}};
    off += t->bytes.size();
  }
  std::string hs = h.dump();
  while (hs.size() % 8) hs.push_back(' ');
  const std::string tmp = path + ".tmp";
  FILE* fp = std::fopen(tmp.c_str(), "wb");
  DP_CHECK(fp, tmp, ": cannot open for writing: ", std::strerror(errno));
  uint64_t n = hs.size();
  bool ok = std::fwrite(&n, 8, 1, fp) == 1 && std::fwrite(hs.data(), 1, hs.size(), fp) == hs.size();
  for (const auto* t : order)
    ok = ok && (t->bytes.empty() || std::fwrite(t->bytes.data(), 1, t->bytes.size(), fp) == t->bytes.size());
  ok = (std::fclose(fp) == 0) && ok;
  DP_CHECK(ok, tmp, ": write failed: ", std::strerror(errno));
  DP_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, path, ": rename failed: ", std::strerror(errno));
}

}  // namespace diffpipe
