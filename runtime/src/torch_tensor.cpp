#include "diffpipe/runtime/torch_tensor.h"

#include <cstring>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

at::ScalarType to_scalar_type(DType d, const std::string& context) {
  switch (d) {
    case DType::F64: return at::kDouble;
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I64: return at::kLong;
    case DType::I32: return at::kInt;
    case DType::I16: return at::kShort;
    case DType::I8: return at::kChar;
    case DType::U8: return at::kByte;
    case DType::BOOL: return at::kBool;
    default: break;
  }
  DP_FAIL(context, ": dtype ", dtype_name(d), " is not supported");
}

DType from_scalar_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::F64;
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kLong: return DType::I64;
    case at::kInt: return DType::I32;
    case at::kShort: return DType::I16;
    case at::kChar: return DType::I8;
    case at::kByte: return DType::U8;
    case at::kBool: return DType::BOOL;
    default: break;
  }
  DP_FAIL("tensor dtype ", c10::toString(t), " cannot be stored in safetensors");
}

at::Tensor tensor_from_view(const std::shared_ptr<SafetensorsFile>& file, const TensorView& v) {
  const auto st = to_scalar_type(v.dtype, file->path() + ": tensor '" + v.name + "'");
  if (v.nbytes == 0) return at::empty(v.shape, at::TensorOptions().dtype(st));
  auto keep = file;  // the deleter keeps the mapping alive
  return at::from_blob(const_cast<uint8_t*>(v.data), v.shape, [keep](void*) mutable { keep.reset(); },
                       at::TensorOptions().dtype(st));
}

TensorBytes tensor_to_bytes(const std::string& name, const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU).contiguous();
  TensorBytes b;
  b.name = name;
  b.dtype = from_scalar_type(c.scalar_type());
  b.shape.assign(c.sizes().begin(), c.sizes().end());
  b.bytes.resize(c.numel() * c.element_size());
  if (!b.bytes.empty()) std::memcpy(b.bytes.data(), c.data_ptr(), b.bytes.size());
  return b;
}

Image image_from_uint8_hwc(const at::Tensor& hwc) {
  DP_CHECK(hwc.dim() == 3 && hwc.size(2) == 3 && hwc.scalar_type() == at::kByte,
           "image: expected a uint8 [H, W, 3] tensor");
  const at::Tensor c = hwc.to(at::kCPU).contiguous();
  Image im;
  im.height = static_cast<int>(c.size(0));
  im.width = static_cast<int>(c.size(1));
  im.channels = 3;
  im.pixels.assign(c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
  return im;
}

at::Tensor image_to_chw(const Image& im) {
  DP_CHECK(im.channels == 3, "image: expected RGB");
  at::Tensor t = at::from_blob(const_cast<uint8_t*>(im.pixels.data()), {im.height, im.width, 3}, at::kByte);
  return t.to(at::kFloat).permute({2, 0, 1}) / 127.5 - 1.0;
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  auto f = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& n : f->names()) out[n] = tensor_from_view(f, f->get(n));
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorBytes> bytes;
  for (const auto& kv : tensors) bytes.push_back(tensor_to_bytes(kv.first, kv.second));
  write_safetensors(path, bytes, metadata);
}

}  // namespace diffpipe
