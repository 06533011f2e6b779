// Bridge between safetensors views and LibTorch tensors. Include only from translation units that use ATen
// (keeps LibTorch out of the light runtime headers).
// Ownership: a tensor made from a view keeps the mapped file alive through its deleter (zero copy on CPU).
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/safetensors.h"

namespace diffpipe {

at::ScalarType to_scalar_type(DType d, const std::string& context);  // throws for dtypes LibTorch lacks
DType from_scalar_type(at::ScalarType t);

// Zero-copy CPU tensor over the mapping (read-only: never write into it).
at::Tensor tensor_from_view(const std::shared_ptr<SafetensorsFile>& file, const TensorView& v);
// Contiguous CPU copy of `t` as raw bytes.
TensorBytes tensor_to_bytes(const std::string& name, const at::Tensor& t);

// 8-bit RGB image <-> tensors: [H, W, 3] uint8 (any device) -> Image; Image -> [3, H, W] float32 in [-1, 1].
Image image_from_uint8_hwc(const at::Tensor& hwc);
at::Tensor image_to_chw(const Image& im);

// Loads every tensor of a file (convenience for tests and tools).
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace diffpipe
