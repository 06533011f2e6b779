#include "diffpipe/train/shapes.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/philox.h"

namespace diffpipe::data {

const std::vector<std::string> kColors = {"red", "green", "blue", "yellow", "purple", "orange"};
const std::vector<Rgb> kColorRgb = {{220, 40, 40}, {40, 170, 60}, {50, 80, 225}, {235, 215, 40}, {150, 60, 190}, {245, 140, 30}};
const std::vector<std::string> kBackgrounds = {"black", "white", "gray"};
const std::vector<Rgb> kBackgroundRgb = {{10, 10, 10}, {245, 245, 245}, {128, 128, 128}};
const std::vector<std::string> kShapes = {"circle", "square", "triangle", "diamond"};
const std::vector<std::string> kSizes = {"small", "large"};
const std::vector<std::string> kPositions = {"top left", "top right", "bottom left", "bottom right", "center"};

namespace {
// Uniform integers from the counter-based generator: draw k of sample `index`.
struct Draws {
  uint64_t seed, index;
  int k = 0;
  int next(int n) {
    uint32_t c[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), static_cast<uint32_t>(k++), 0x5a5a};
    philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32) ^ 0x9e37u);
    return static_cast<int>(c[0] % static_cast<uint32_t>(n));
  }
};
int find(const std::vector<std::string>& v, const std::string& w, const std::string& cap) {
  auto it = std::find(v.begin(), v.end(), w);
  DP_CHECK(it != v.end(), "caption '", cap, "': unknown word '", w, "'");
  return static_cast<int>(it - v.begin());
}
}  // namespace

Scene sample_scene(uint64_t seed, uint64_t index) {
  Draws d{seed, index};
  Scene s;
  s.background = d.next(static_cast<int>(kBackgrounds.size()));
  const int n = d.next(3) == 0 ? 2 : 1;  // a third of the scenes have two objects
  std::set<int> used;
  for (int i = 0; i < n; ++i) {
    Object o;
    o.color = d.next(static_cast<int>(kColors.size()));
    o.shape = d.next(static_cast<int>(kShapes.size()));
    o.size = n == 2 ? 0 : d.next(2);
    do o.position = d.next(static_cast<int>(kPositions.size()));
    while (used.count(o.position) || (n == 2 && o.position == 4));  // two objects: corners only
    used.insert(o.position);
    s.objects.push_back(o);
  }
  return s;
}

static std::string where(int position) {
  return position == 4 ? "in the center" : "at the " + kPositions[position];
}

std::string caption(const Scene& s) {
  std::ostringstream os;
  for (size_t i = 0; i < s.objects.size(); ++i) {
    const Object& o = s.objects[i];
    if (i) os << " and ";
    os << "a ";
    if (s.objects.size() == 1) os << kSizes[o.size] << " ";
    os << kColors[o.color] << " " << kShapes[o.shape] << " " << where(o.position);
  }
  os << " on a " << kBackgrounds[s.background] << " background";
  return os.str();
}

Scene parse_caption(const std::string& cap) {
  std::istringstream is(cap);
  std::vector<std::string> w;
  for (std::string t; is >> t;) w.push_back(t);
  Scene s;
  size_t i = 0;
  auto expect = [&](const std::string& word) {
    DP_CHECK(i < w.size() && w[i] == word, "caption '", cap, "': expected '", word, "' at word ", i + 1);
    ++i;
  };
  while (true) {
    expect("a");
    Object o;
    DP_CHECK(i < w.size(), "caption '", cap, "': truncated");
    if (w[i] == "small" || w[i] == "large") o.size = find(kSizes, w[i++], cap);
    DP_CHECK(i + 1 < w.size(), "caption '", cap, "': truncated");
    o.color = find(kColors, w[i++], cap);
    o.shape = find(kShapes, w[i++], cap);
    DP_CHECK(i + 1 < w.size(), "caption '", cap, "': truncated");
    if (w[i] == "in") {
      expect("in");
      expect("the");
      expect("center");
      o.position = 4;
    } else {
      expect("at");
      expect("the");
      DP_CHECK(i + 1 < w.size(), "caption '", cap, "': truncated");
      o.position = find(kPositions, w[i] + " " + w[i + 1], cap);
      i += 2;
    }
    s.objects.push_back(o);
    if (i < w.size() && w[i] == "and") {
      ++i;
      continue;
    }
    break;
  }
  expect("on");
  expect("a");
  DP_CHECK(i < w.size(), "caption '", cap, "': truncated");
  s.background = find(kBackgrounds, w[i++], cap);
  expect("background");
  DP_CHECK(i == w.size(), "caption '", cap, "': unexpected words after 'background'");
  return s;
}

void object_geometry(const Object& o, int size, double* cx, double* cy, double* radius) {
  const double f = size / 64.0;
  const double xs[] = {16, 48, 16, 48, 32}, ys[] = {16, 16, 48, 48, 32};
  *cx = xs[o.position] * f;
  *cy = ys[o.position] * f;
  *radius = (o.size == 0 ? 7.5 : 13.0) * f;
}

// Inside test for a shape centred at (cx, cy) with "radius" r.
static bool inside(int shape, double x, double y, double cx, double cy, double r) {
  const double dx = x - cx, dy = y - cy;
  switch (shape) {
    case 0: return dx * dx + dy * dy <= r * r;                                   // circle
    case 1: return std::abs(dx) <= r * 0.85 && std::abs(dy) <= r * 0.85;          // square
    case 2: {                                                                    // triangle, apex up
      if (dy < -r || dy > r * 0.75) return false;
      const double half = (dy + r) / (1.75 * r) * r;                             // widens downwards
      return std::abs(dx) <= half;
    }
    default: return std::abs(dx) + std::abs(dy) <= r;                            // diamond
  }
}

Image render(const Scene& s, int size) {
  Image im;
  im.width = im.height = size;
  im.channels = 3;
  const Rgb bg = kBackgroundRgb[s.background];
  im.pixels.resize(static_cast<size_t>(size) * size * 3);
  for (size_t p = 0; p < im.pixels.size(); p += 3) {
    im.pixels[p] = bg.r;
    im.pixels[p + 1] = bg.g;
    im.pixels[p + 2] = bg.b;
  }
  for (const Object& o : s.objects) {
    double cx, cy, r;
    object_geometry(o, size, &cx, &cy, &r);
    const Rgb c = kColorRgb[o.color];
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x) {
        // 4x supersampling for smooth edges
        int hits = 0;
        for (int sy = 0; sy < 2; ++sy)
          for (int sx = 0; sx < 2; ++sx) hits += inside(o.shape, x + 0.25 + 0.5 * sx, y + 0.25 + 0.5 * sy, cx, cy, r);
        if (!hits) continue;
        const double a = hits / 4.0;
        uint8_t* p = &im.pixels[(static_cast<size_t>(y) * size + x) * 3];
        p[0] = static_cast<uint8_t>(std::lround(p[0] * (1 - a) + c.r * a));
        p[1] = static_cast<uint8_t>(std::lround(p[1] * (1 - a) + c.g * a));
        p[2] = static_cast<uint8_t>(std::lround(p[2] * (1 - a) + c.b * a));
      }
  }
  return im;
}

std::vector<std::string> vocabulary_words() {
  std::set<std::string> w = {"a", "at", "the", "in", "on", "and", "background", "center", "top", "bottom", "left", "right"};
  for (const auto* v : {&kColors, &kBackgrounds, &kShapes, &kSizes}) w.insert(v->begin(), v->end());
  return std::vector<std::string>(w.begin(), w.end());
}

Image downsample(const Image& im, int f) {
  DP_CHECK(f >= 1 && im.width % f == 0 && im.height % f == 0, "downsample: size ", im.width, "x", im.height,
           " is not divisible by ", f);
  Image out;
  out.width = im.width / f;
  out.height = im.height / f;
  out.channels = im.channels;
  out.pixels.resize(static_cast<size_t>(out.width) * out.height * out.channels);
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x)
      for (int c = 0; c < im.channels; ++c) {
        int sum = 0;
        for (int dy = 0; dy < f; ++dy)
          for (int dx = 0; dx < f; ++dx) sum += im.at(y * f + dy, x * f + dx, c);
        out.pixels[(static_cast<size_t>(y) * out.width + x) * out.channels + c] = static_cast<uint8_t>((sum + f * f / 2) / (f * f));
      }
  return out;
}

}  // namespace diffpipe::data
