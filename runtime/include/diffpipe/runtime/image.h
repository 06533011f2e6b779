// 8-bit RGB images and PNG files (libpng).
// Owns: pixel bytes, HWC order. Thread-safety: value types; functions are reentrant.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace diffpipe {

struct Image {
  int width = 0, height = 0, channels = 3;
  std::vector<uint8_t> pixels;  // [height, width, channels]
  uint8_t at(int y, int x, int c) const { return pixels[(static_cast<size_t>(y) * width + x) * channels + c]; }
};

void write_png(const std::string& path, const Image& img);  // via path.tmp + rename; throws naming the file
Image read_png(const std::string& path);                    // 8-bit gray/RGB/RGBA -> RGB; throws naming the file

// Tiles images (all the same size) into a grid with `cols` columns and a `pad`-pixel border.
Image contact_sheet(const std::vector<Image>& images, int cols, int pad = 2);

}  // namespace diffpipe
