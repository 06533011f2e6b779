// The synthetic captioned-image dataset diffpipe trains its own model on: coloured shapes on plain
// backgrounds (one or two objects), rendered at 64x64 with captions such as
// "a small red circle at the top left on a black background". Deterministic: sample i of seed s is always
// the same (counter-based draws). The caption grammar is parseable back into the scene, which the analytic
// fidelity checker (fidelity.h) uses. Thread-safety: pure functions.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "diffpipe/runtime/image.h"

namespace diffpipe::data {

struct Rgb {
  uint8_t r, g, b;
};

extern const std::vector<std::string> kColors;       // object colours
extern const std::vector<Rgb> kColorRgb;
extern const std::vector<std::string> kBackgrounds;  // background colours
extern const std::vector<Rgb> kBackgroundRgb;
extern const std::vector<std::string> kShapes;
extern const std::vector<std::string> kSizes;        // small, large
extern const std::vector<std::string> kPositions;    // "top left", ..., "center"

struct Object {
  int color = 0, shape = 0, size = 0, position = 0;
};
struct Scene {
  int background = 0;
  std::vector<Object> objects;  // 1 or 2, at distinct positions
};

constexpr int kImageSize = 64;

Scene sample_scene(uint64_t seed, uint64_t index);
std::string caption(const Scene& s);
Scene parse_caption(const std::string& caption);  // throws naming the caption when it is not in the grammar
Image render(const Scene& s, int size = kImageSize);
// Object centre and radius in pixels for an image of `size`.
void object_geometry(const Object& o, int size, double* cx, double* cy, double* radius);
// Every word the grammar uses (for the tokenizer's vocabulary).
std::vector<std::string> vocabulary_words();
// Box-filter downsampling by an integer factor (super-resolution training pairs).
Image downsample(const Image& im, int factor);

}  // namespace diffpipe::data
