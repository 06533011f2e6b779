// 8-bit RGB images and PNG files (libpng).
// Owns: pixel bytes, HWC order. Thread-safety: value types; functions are reentrant.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffpipe {

struct Image {
  int width = 0, height = 0, channels = 3;
  std::vector<uint8_t> pixels;  // [height, width, channels]
  uint8_t at(int y, int x, int c) const { return pixels[(static_cast<size_t>(y) * width + x) * channels + c]; }
};

// Text chunks of a PNG (key, UTF-8 value), e.g. {"parameters", "prompt\nSteps: 25, ..."} as image tools read it.
using PngText = std::vector<std::pair<std::string, std::string>>;
std::vector<uint8_t> encode_png(const Image& img, const PngText& text = {}, const std::string& name = "image");
// Writes via path.tmp + rename, so `path` is never half-written; throws naming the file (disk full included).
void write_png(const std::string& path, const Image& img, const PngText& text = {});
void write_file_atomic(const std::string& path, const void* data, size_t n);
PngText read_png_text(const std::string& path);
// 8-bit gray/RGB/RGBA -> RGB (keep_alpha: RGBA when the PNG has transparency); throws naming the file
Image read_png(const std::string& path, bool keep_alpha = false);
// A PNG held in memory; errors name `origin`.
Image decode_png(const uint8_t* data, size_t n, const std::string& origin, bool keep_alpha = false);
// An image a request names: a PNG file's path, or the PNG itself inline as a data URI
// ("data:image/png;base64,...": what HTTP clients send, and what travels to any node without a shared file system).
// Throws naming the path (or "an inline image" and what is wrong with it).
Image read_image_ref(const std::string& ref, bool keep_alpha = false);
bool is_data_uri(const std::string& ref);
// What messages and PNG metadata show for such a reference: the path, or "inline PNG (N bytes)".
std::string describe_image_ref(const std::string& ref);

std::string base64_encode(const std::vector<uint8_t>& in);
// Standard alphabet, '=' padding optional, whitespace skipped; throws on any other character.
std::vector<uint8_t> base64_decode(const std::string& in);

// Tiles images (all the same size) into a grid with `cols` columns and a `pad`-pixel border.
Image contact_sheet(const std::vector<Image>& images, int cols, int pad = 2);

}  // namespace diffpipe
