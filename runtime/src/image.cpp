#include "diffpipe/runtime/image.h"

#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

namespace {
void append_bytes(png_structp png, png_bytep data, png_size_t n) {
  auto* out = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  out->insert(out->end(), data, data + n);
}
void no_flush(png_structp) {}
}  // namespace

std::vector<uint8_t> encode_png(const Image& img, const PngText& text, const std::string& name) {
  DP_CHECK(img.width > 0 && img.height > 0 && (img.channels == 3 || img.channels == 1), name,
           ": cannot write an image of ", img.width, "x", img.height, "x", img.channels);
  DP_CHECK(img.pixels.size() == static_cast<size_t>(img.width) * img.height * img.channels, name,
           ": pixel buffer size does not match the image size");
  std::vector<uint8_t> out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    DP_FAIL(name, ": libpng failed to encode the image");
  }
  png_set_write_fn(png, &out, append_bytes, no_flush);
  png_set_IHDR(png, info, img.width, img.height, 8, img.channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  // text chunks (iTXt: UTF-8 keys' values, as image tools read them)
  std::vector<png_text> chunks(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    chunks[i] = png_text{};
    chunks[i].compression = PNG_ITXT_COMPRESSION_NONE;
    chunks[i].key = const_cast<png_charp>(text[i].first.c_str());
    chunks[i].text = const_cast<png_charp>(text[i].second.c_str());
    chunks[i].itxt_length = text[i].second.size();
  }
  if (!chunks.empty()) png_set_text(png, info, chunks.data(), static_cast<int>(chunks.size()));
  png_write_info(png, info);
  for (int y = 0; y < img.height; ++y)
    png_write_row(png, const_cast<png_bytep>(img.pixels.data() + static_cast<size_t>(y) * img.width * img.channels));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

void write_file_atomic(const std::string& path, const void* data, size_t n) {
  const std::string tmp = path + ".tmp";
  FILE* fp = std::fopen(tmp.c_str(), "wb");
  DP_CHECK(fp, tmp, ": cannot open for writing: ", std::strerror(errno));
  const size_t w = n ? std::fwrite(data, 1, n, fp) : 0;
  const int err = w == n ? 0 : errno;
  if (std::fclose(fp) != 0 || w != n) {
    std::remove(tmp.c_str());
    DP_FAIL(path, ": write failed: ", std::strerror(err ? err : errno), " (disk full?)");
  }
  DP_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, path, ": rename failed: ", std::strerror(errno));
}

void write_png(const std::string& path, const Image& img, const PngText& text) {
  const std::vector<uint8_t> bytes = encode_png(img, text, path);
  write_file_atomic(path, bytes.data(), bytes.size());
}

PngText read_png_text(const std::string& path) {
  FILE* fp = std::fopen(path.c_str(), "rb");
  DP_CHECK(fp, path, ": cannot open: ", std::strerror(errno));
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(fp);
    DP_FAIL(path, ": not a readable PNG");
  }
  png_init_io(png, fp);
  png_read_info(png, info);
  png_textp t = nullptr;
  int n = 0;
  png_get_text(png, info, &t, &n);
  PngText out;
  for (int i = 0; i < n; ++i) out.push_back({t[i].key, std::string(t[i].text, t[i].text_length ? t[i].text_length : t[i].itxt_length)});
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(fp);
  return out;
}

namespace {
// libpng reports through these instead of printing to stderr: the reason joins the thrown error.
void png_fail(png_structp png, png_const_charp msg) {
  if (auto* why = static_cast<std::string*>(png_get_error_ptr(png))) *why = msg ? msg : "";
  png_longjmp(png, 1);
}
void png_ignore_warning(png_structp, png_const_charp) {}

struct MemoryReader {
  const uint8_t* data;
  size_t n, at;
};
void read_bytes(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<MemoryReader*>(png_get_io_ptr(png));
  if (n > r->n - r->at) png_error(png, "truncated");
  std::memcpy(out, r->data + r->at, n);
  r->at += n;
}
}  // namespace

Image decode_png(const uint8_t* data, size_t n, const std::string& origin, bool keep_alpha) {
  DP_CHECK(n >= 8 && png_sig_cmp(data, 0, 8) == 0, origin, ": not a PNG image");
  std::string why;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &why, png_fail, png_ignore_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  MemoryReader reader{data, n, 8};
  Image img;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    DP_FAIL(origin, ": corrupt PNG", why.empty() ? "" : " (" + why + ")");
  }
  png_set_read_fn(png, &reader, read_bytes);
  png_set_sig_bytes(png, 8);
  png_read_info(png, info);
  png_set_strip_16(png);
  png_set_palette_to_rgb(png);
  png_set_expand_gray_1_2_4_to_8(png);
  png_set_gray_to_rgb(png);
  const bool alpha = keep_alpha && ((png_get_color_type(png, info) & PNG_COLOR_MASK_ALPHA) != 0 ||
                                    png_get_valid(png, info, PNG_INFO_tRNS) != 0);
  if (alpha) png_set_tRNS_to_alpha(png);
  else png_set_strip_alpha(png);
  png_read_update_info(png, info);
  img.width = static_cast<int>(png_get_image_width(png, info));
  img.height = static_cast<int>(png_get_image_height(png, info));
  img.channels = alpha ? 4 : 3;
  const size_t row = static_cast<size_t>(img.width) * img.channels;
  img.pixels.resize(row * img.height);
  for (int y = 0; y < img.height; ++y) png_read_row(png, img.pixels.data() + static_cast<size_t>(y) * row, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return img;
}

namespace {
constexpr const char* kDataUriPng = "data:image/png;base64,";
}

bool is_data_uri(const std::string& ref) { return ref.rfind("data:", 0) == 0; }

std::string describe_image_ref(const std::string& ref) {
  if (!is_data_uri(ref)) return ref;
  return "inline PNG (" + std::to_string(ref.size()) + " characters)";
}

Image read_image_ref(const std::string& ref, bool keep_alpha) {
  if (!is_data_uri(ref)) return read_png(ref, keep_alpha);
  const size_t comma = ref.find(',');
  DP_CHECK(ref.rfind(kDataUriPng, 0) == 0, "an inline image must be a data URI \"", kDataUriPng, "...\", got \"",
           ref.substr(0, std::min<size_t>(comma == std::string::npos ? 40 : comma + 1, 40)), "\"");
  std::vector<uint8_t> bytes;
  try {
    bytes = base64_decode(ref.substr(std::strlen(kDataUriPng)));
  } catch (const std::exception& e) {
    DP_FAIL("an inline image: ", e.what());
  }
  return decode_png(bytes.data(), bytes.size(), "an inline image", keep_alpha);
}

std::string base64_encode(const std::vector<uint8_t>& in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
    out += {t[v >> 18], t[(v >> 12) & 63], t[(v >> 6) & 63], t[v & 63]};
  }
  if (i + 1 == in.size()) {
    const uint32_t v = in[i] << 16;
    out += {t[v >> 18], t[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == in.size()) {
    const uint32_t v = (in[i] << 16) | (in[i + 1] << 8);
    out += {t[v >> 18], t[(v >> 12) & 63], t[(v >> 6) & 63], '='};
  }
  return out;
}

std::vector<uint8_t> base64_decode(const std::string& in) {
  std::vector<uint8_t> out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const char c = in[i];
    int v;
    if (c >= 'A' && c <= 'Z') v = c - 'A';
    else if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
    else if (c >= '0' && c <= '9') v = c - '0' + 52;
    else if (c == '+') v = 62;
    else if (c == '/') v = 63;
    else if (c == '=') { ++pad; continue; }
    else if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    else DP_FAIL("invalid base64 character '", std::string(1, c), "' at offset ", i);
    DP_CHECK(pad == 0, "invalid base64: data after '=' padding at offset ", i);
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((acc >> bits) & 0xFF));
    }
  }
  DP_CHECK(bits < 6 && pad <= 2, "invalid base64: truncated");
  return out;
}

Image read_png(const std::string& path, bool keep_alpha) {
  FILE* fp = std::fopen(path.c_str(), "rb");
  DP_CHECK(fp, path, ": cannot open: ", std::strerror(errno));
  std::vector<uint8_t> bytes;
  uint8_t buf[1 << 16];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), fp)) > 0;) bytes.insert(bytes.end(), buf, buf + n);
  const bool failed = std::ferror(fp) != 0;
  std::fclose(fp);
  DP_CHECK(!failed, path, ": read error");
  return decode_png(bytes.data(), bytes.size(), path, keep_alpha);
}

Image contact_sheet(const std::vector<Image>& images, int cols, int pad) {
  DP_CHECK(!images.empty(), "contact sheet: no images");
  const int w = images[0].width, h = images[0].height, ch = images[0].channels;
  for (const auto& im : images)
    DP_CHECK(im.width == w && im.height == h && im.channels == ch, "contact sheet: images differ in size");
  cols = std::max(1, std::min<int>(cols, static_cast<int>(images.size())));
  const int rows = (static_cast<int>(images.size()) + cols - 1) / cols;
  Image out;
  out.width = cols * w + (cols + 1) * pad;
  out.height = rows * h + (rows + 1) * pad;
  out.channels = ch;
  out.pixels.assign(static_cast<size_t>(out.width) * out.height * ch, 255);
  for (size_t i = 0; i < images.size(); ++i) {
    const int ox = pad + static_cast<int>(i % cols) * (w + pad), oy = pad + static_cast<int>(i / cols) * (h + pad);
    for (int y = 0; y < h; ++y)
      std::memcpy(&out.pixels[(static_cast<size_t>(oy + y) * out.width + ox) * ch],
                  &images[i].pixels[static_cast<size_t>(y) * w * ch], static_cast<size_t>(w) * ch);
  }
  return out;
}

}  // namespace diffpipe
