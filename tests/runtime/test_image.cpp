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
