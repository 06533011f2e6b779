#include "diffpipe/runtime/image.h"

#include <png.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "diffpipe/runtime/error.h"

namespace diffpipe {

void write_png(const std::string& path, const Image& img) {
  DP_CHECK(img.width > 0 && img.height > 0 && (img.channels == 3 || img.channels == 1), path,
           ": cannot write an image of ", img.width, "x", img.height, "x", img.channels);
  DP_CHECK(img.pixels.size() == static_cast<size_t>(img.width) * img.height * img.channels, path,
           ": pixel buffer size does not match the image size");
  const std::string tmp = path + ".tmp";
  FILE* fp = std::fopen(tmp.c_str(), "wb");
  DP_CHECK(fp, tmp, ": cannot open for writing: ", std::strerror(errno));
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(fp);
    std::remove(tmp.c_str());
    DP_FAIL(path, ": libpng failed to write the image");
  }
  png_init_io(png, fp);
  png_set_IHDR(png, info, img.width, img.height, 8, img.channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < img.height; ++y)
    png_write_row(png, const_cast<png_bytep>(img.pixels.data() + static_cast<size_t>(y) * img.width * img.channels));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  DP_CHECK(std::fclose(fp) == 0, tmp, ": write failed: ", std::strerror(errno));
  DP_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, path, ": rename failed: ", std::strerror(errno));
}

Image read_png(const std::string& path) {
  FILE* fp = std::fopen(path.c_str(), "rb");
  DP_CHECK(fp, path, ": cannot open: ", std::strerror(errno));
  png_byte sig[8];
  if (std::fread(sig, 1, 8, fp) != 8 || png_sig_cmp(sig, 0, 8) != 0) {
    std::fclose(fp);
    DP_FAIL(path, ": not a PNG file");
  }
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  Image img;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    std::fclose(fp);
    DP_FAIL(path, ": corrupt PNG");
  }
  png_init_io(png, fp);
  png_set_sig_bytes(png, 8);
  png_read_info(png, info);
  png_set_strip_16(png);
  png_set_palette_to_rgb(png);
  png_set_expand_gray_1_2_4_to_8(png);
  png_set_gray_to_rgb(png);
  png_set_strip_alpha(png);
  png_read_update_info(png, info);
  img.width = static_cast<int>(png_get_image_width(png, info));
  img.height = static_cast<int>(png_get_image_height(png, info));
  img.channels = 3;
  img.pixels.resize(static_cast<size_t>(img.width) * img.height * 3);
  for (int y = 0; y < img.height; ++y) png_read_row(png, img.pixels.data() + static_cast<size_t>(y) * img.width * 3, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(fp);
  return img;
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
