// Analytic fidelity checker for the shapes dataset: does a generated image show what its caption says?
// Per object: colour (nearest palette colour of the object's pixels), shape (best IoU against the four shapes
// fitted to the object's bounding box), position (nearest of the five anchor points; for two-object scenes the
// object must be found in its own corner). Works on any square size. Pure functions.
#pragma once
#include <string>
#include <vector>

#include "diffpipe/train/shapes.h"

namespace diffpipe::data {

struct ObjectVerdict {
  bool found = false;  // enough foreground pixels where the object should be
  bool color = false, shape = false, position = false;
  int seen_color = -1, seen_shape = -1, seen_position = -1;
};

std::vector<ObjectVerdict> check_image(const Image& im, const Scene& expected);

struct FidelitySummary {
  size_t objects = 0;
  double color = 0, shape = 0, position = 0;  // fractions of objects judged correct
};
FidelitySummary summarize(const std::vector<std::vector<ObjectVerdict>>& verdicts);

}  // namespace diffpipe::data
