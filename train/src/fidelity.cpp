#include "diffpipe/train/fidelity.h"

#include <algorithm>
#include <cmath>
#include <array>
#include <map>

namespace diffpipe::data {

namespace {
double dist2(const uint8_t* p, Rgb c) {
  const double dr = p[0] - c.r, dg = p[1] - c.g, db = p[2] - c.b;
  return dr * dr + dg * dg + db * db;
}

// Background: the most common (coarsely quantised) colour on the image border.
Rgb estimate_background(const Image& im) {
  std::map<int, std::pair<int, std::array<long, 3>>> bins;
  auto add = [&](int y, int x) {
    const uint8_t* p = &im.pixels[(static_cast<size_t>(y) * im.width + x) * 3];
    const int key = (p[0] / 32) * 64 + (p[1] / 32) * 8 + p[2] / 32;
    auto& b = bins[key];
    ++b.first;
    for (int c = 0; c < 3; ++c) b.second[c] += p[c];
  };
  for (int i = 0; i < im.width; ++i) {
    add(0, i);
    add(im.height - 1, i);
    add(i, 0);
    add(i, im.width - 1);
  }
  auto best = std::max_element(bins.begin(), bins.end(), [](auto& a, auto& b) { return a.second.first < b.second.first; });
  const int n = best->second.first;
  return Rgb{static_cast<uint8_t>(best->second.second[0] / n), static_cast<uint8_t>(best->second.second[1] / n),
             static_cast<uint8_t>(best->second.second[2] / n)};
}

bool inside(int shape, double x, double y, double cx, double cy, double r) {
  const double dx = x - cx, dy = y - cy;
  switch (shape) {
    case 0: return dx * dx + dy * dy <= r * r;
    case 1: return std::abs(dx) <= r * 0.85 && std::abs(dy) <= r * 0.85;
    case 2: {
      if (dy < -r || dy > r * 0.75) return false;
      return std::abs(dx) <= (dy + r) / (1.75 * r) * r;
    }
    default: return std::abs(dx) + std::abs(dy) <= r;
  }
}
}  // namespace

std::vector<ObjectVerdict> check_image(const Image& im, const Scene& expected) {
  const int S = im.width;
  const Rgb bg = estimate_background(im);
  const double thr = 60.0 * 60.0;
  std::vector<uint8_t> fg(static_cast<size_t>(S) * S, 0);
  for (int y = 0; y < S; ++y)
    for (int x = 0; x < S; ++x) fg[y * S + x] = dist2(&im.pixels[(static_cast<size_t>(y) * S + x) * 3], bg) > thr;
  std::vector<ObjectVerdict> out;
  const bool two = expected.objects.size() > 1;
  for (const Object& o : expected.objects) {
    ObjectVerdict v;
    // region: the whole image for a single object; the object's quadrant otherwise
    int x0 = 0, y0 = 0, x1 = S, y1 = S;
    if (two) {
      x0 = (o.position == 1 || o.position == 3) ? S / 2 : 0;
      y0 = (o.position == 2 || o.position == 3) ? S / 2 : 0;
      x1 = x0 + S / 2;
      y1 = y0 + S / 2;
    }
    long n = 0;
    double sx = 0, sy = 0;
    int bx0 = S, by0 = S, bx1 = -1, by1 = -1;
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) {
        if (!fg[y * S + x]) continue;
        ++n;
        sx += x;
        sy += y;
        bx0 = std::min(bx0, x);
        by0 = std::min(by0, y);
        bx1 = std::max(bx1, x);
        by1 = std::max(by1, y);
      }
    double ecx, ecy, er;
    object_geometry(o, S, &ecx, &ecy, &er);
    v.found = n >= std::max(4.0, 0.2 * er * er);
    if (!v.found) {
      out.push_back(v);
      continue;
    }
    // colour: majority vote of the object's pixels, each voting for its nearest palette colour (edge pixels
    // blended with the background then cannot drag a mean towards a neighbouring colour)
    std::vector<int> votes(kColorRgb.size(), 0);
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) {
        if (!fg[y * S + x]) continue;
        const uint8_t* p = &im.pixels[(static_cast<size_t>(y) * S + x) * 3];
        int bc = 0;
        double bd = 1e18;
        for (size_t c = 0; c < kColorRgb.size(); ++c)
          if (dist2(p, kColorRgb[c]) < bd) {
            bd = dist2(p, kColorRgb[c]);
            bc = static_cast<int>(c);
          }
        ++votes[bc];
      }
    v.seen_color = static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
    double best = 1e18;
    // position: nearest anchor to the centroid (two objects: the quadrant's anchor, found above)
    const double cx = sx / n, cy = sy / n;
    best = 1e18;
    for (int p = 0; p < static_cast<int>(kPositions.size()); ++p) {
      Object t = o;
      t.position = p;
      double ax, ay, ar;
      object_geometry(t, S, &ax, &ay, &ar);
      const double d = (ax - cx) * (ax - cx) + (ay - cy) * (ay - cy);
      if (d < best) {
        best = d;
        v.seen_position = p;
      }
    }
    // shape: each candidate fitted to the bounding box, best IoU
    const double bw = bx1 - bx0 + 1, bh = by1 - by0 + 1, bcx = (bx0 + bx1 + 1) / 2.0, bcy = (by0 + by1 + 1) / 2.0;
    double best_iou = -1;
    for (int sh = 0; sh < static_cast<int>(kShapes.size()); ++sh) {
      double r, scy = bcy;
      switch (sh) {
        case 0: r = std::max(bw, bh) / 2; break;
        case 1: r = std::max(bw, bh) / 1.7; break;
        case 2: r = std::max(bh / 1.75, bw / 1.75 / 0.999); scy = by0 + r; break;  // apex at the top of the box
        default: r = std::max(bw, bh) / 2; break;
      }
      long inter = 0, uni = 0;
      for (int y = std::max(y0, by0 - 2); y < std::min(y1, by1 + 3); ++y)
        for (int x = std::max(x0, bx0 - 2); x < std::min(x1, bx1 + 3); ++x) {
          const bool a = fg[y * S + x], b = inside(sh, x + 0.5, y + 0.5, bcx, scy, r);
          inter += a && b;
          uni += a || b;
        }
      const double iou = uni ? double(inter) / uni : 0;
      if (iou > best_iou) {
        best_iou = iou;
        v.seen_shape = sh;
      }
    }
    v.color = v.seen_color == o.color;
    v.shape = v.seen_shape == o.shape;
    v.position = v.seen_position == o.position;
    out.push_back(v);
  }
  return out;
}

FidelitySummary summarize(const std::vector<std::vector<ObjectVerdict>>& verdicts) {
  FidelitySummary s;
  for (const auto& img : verdicts)
    for (const auto& v : img) {
      ++s.objects;
      s.color += v.color;
      s.shape += v.shape;
      s.position += v.position;
    }
  if (s.objects) {
    s.color /= s.objects;
    s.shape /= s.objects;
    s.position /= s.objects;
  }
  return s;
}

}  // namespace diffpipe::data
