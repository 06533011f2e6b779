#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "test_util.h"

using namespace diffpipe;

TEST(Image, PngRoundTripIsExact) {
  Image im;
  im.width = 7;
  im.height = 5;
  for (int i = 0; i < 7 * 5 * 3; ++i) im.pixels.push_back(static_cast<uint8_t>(i * 37));
  const std::string p = test::scratch_dir("png") + "/a.png";
  write_png(p, im);
  Image back = read_png(p);
  EXPECT_EQ(back.width, 7);
  EXPECT_EQ(back.height, 5);
  EXPECT_EQ(back.pixels, im.pixels);
}

TEST(Image, NotAPngNamesTheFile) {
  const std::string p = test::scratch_dir("png-bad") + "/b.png";
  std::ofstream(p) << "hello, not a png";
  try {
    read_png(p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("b.png: not a PNG"), std::string::npos) << e.what();
  }
}

TEST(Image, ContactSheetPlacesTilesInAGrid) {
  std::vector<Image> tiles;
  for (int k = 0; k < 3; ++k) {
    Image im;
    im.width = im.height = 2;
    im.pixels.assign(12, static_cast<uint8_t>(10 * (k + 1)));
    tiles.push_back(im);
  }
  Image s = contact_sheet(tiles, 2, 1);
  EXPECT_EQ(s.width, 2 * 2 + 3);
  EXPECT_EQ(s.height, 2 * 2 + 3);
  EXPECT_EQ(s.at(1, 1, 0), 10);  // tile 0 at (1, 1)
  EXPECT_EQ(s.at(1, 4, 0), 20);  // tile 1 at (1, 4)
  EXPECT_EQ(s.at(4, 1, 0), 30);  // tile 2 at (4, 1)
  EXPECT_EQ(s.at(0, 0, 0), 255); // border
  EXPECT_EQ(s.at(4, 4, 0), 255); // empty slot
}

// base64 against known vectors (RFC 4648 section 10), every length's padding, whitespace skipped, bad input refused.
TEST(Image, Base64KnownVectorsAndErrors) {
  const std::vector<std::pair<std::string, std::string>> rfc = {
      {"", ""}, {"f", "Zg=="}, {"fo", "Zm8="}, {"foo", "Zm9v"}, {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="},
      {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, coded] : rfc) {
    const std::vector<uint8_t> bytes(plain.begin(), plain.end());
    EXPECT_EQ(base64_encode(bytes), coded) << plain;
    EXPECT_EQ(base64_decode(coded), bytes) << coded;
  }
  EXPECT_EQ(base64_decode("Zm9v\nYmFy\r\n"), (std::vector<uint8_t>{'f', 'o', 'o', 'b', 'a', 'r'}));
  EXPECT_NE(test::error_of([] { base64_decode("Zm9v*mFy"); }).find("invalid base64 character '*' at offset 4"),
            std::string::npos);
  EXPECT_NE(test::error_of([] { base64_decode("Zg==Zg=="); }).find("data after '=' padding"), std::string::npos);
  EXPECT_NE(test::error_of([] { base64_decode("Z"); }).find("truncated"), std::string::npos);
}

// A request's image may be a path or the PNG inline as a data URI: both read the same pixels; a wrong media type,
// bad base64 or bytes that are not a PNG are refused as "an inline image".
TEST(Image, InlineDataUriReadsLikeTheFile) {
  Image im;
  im.width = 6;
  im.height = 4;
  for (int i = 0; i < 6 * 4 * 3; ++i) im.pixels.push_back(static_cast<uint8_t>(i * 11 + 3));
  const std::string p = test::scratch_dir("png-uri") + "/c.png";
  write_png(p, im);
  const std::vector<uint8_t> bytes = encode_png(im);
  const std::string uri = "data:image/png;base64," + base64_encode(bytes);
  EXPECT_TRUE(is_data_uri(uri));
  EXPECT_FALSE(is_data_uri(p));
  EXPECT_EQ(read_image_ref(uri).pixels, im.pixels);
  EXPECT_EQ(read_image_ref(p).pixels, im.pixels);
  EXPECT_EQ(decode_png(bytes.data(), bytes.size(), "x").pixels, im.pixels);
  EXPECT_EQ(describe_image_ref(p), p);
  EXPECT_EQ(describe_image_ref(uri).rfind("inline PNG (", 0), 0u);
  EXPECT_NE(test::error_of([] { read_image_ref("data:image/jpeg;base64,AAAA"); }).find("must be a data URI"),
            std::string::npos);
  EXPECT_NE(test::error_of([] { read_image_ref("data:image/png;base64,@@@"); }).find("an inline image: invalid base64"),
            std::string::npos);
  EXPECT_NE(test::error_of([] { read_image_ref("data:image/png;base64," + base64_encode({1, 2, 3, 4, 5, 6, 7, 8, 9})); })
                .find("an inline image: not a PNG"),
            std::string::npos);
  const std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<long>(bytes.size() / 2));
  EXPECT_NE(test::error_of([&] { decode_png(cut.data(), cut.size(), "half"); }).find("half: corrupt PNG"),
            std::string::npos);
}
