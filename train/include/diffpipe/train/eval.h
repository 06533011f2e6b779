// Evaluation inputs: the image folders generate and data write (DIR/images.jsonl + PNGs), loaded as tensors,
// and their FID features (a supplied Inception-v3's pool3, or a model's image tower).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "diffpipe/train/image_tower.h"
#include "diffpipe/train/inception.h"

namespace diffpipe::train {

struct Entry {
  std::string prompt, file;
};
// The finished images listed in DIR/images.jsonl (generate's or data's format); lines with another status are
// counted in `skipped`. Errors name the file and line.
std::vector<Entry> read_index(const std::string& dir, size_t* skipped = nullptr);
at::Tensor load_images(const std::vector<Entry>& es);  // [N, 3, H, W] in [-1, 1]
// FID features of `es`, 32 images at a time: the supplied Inception-v3's pool3 (2048-d) or the image tower.
at::Tensor fid_features(const std::vector<Entry>& es, const FidInception* inception, const ImageTower* tower);

}  // namespace diffpipe::train
