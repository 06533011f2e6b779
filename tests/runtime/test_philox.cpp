#include <cmath>

#include "diffpipe/runtime/philox.h"
#include "test_util.h"

using namespace diffpipe;

TEST(Philox, DeterministicAndPrefixStable) {
  std::vector<float> a(1001), b(1001), c(10);
  philox_normal(42, 0, a.data(), 1001);
  philox_normal(42, 0, b.data(), 1001);
  philox_normal(42, 0, c.data(), 10);
  EXPECT_EQ(a, b);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(a[i], c[i]) << "value " << i << " depends on the request length";
}

TEST(Philox, SeedsAndStreamsDiffer) {
  std::vector<float> a(64), b(64), c(64);
  philox_normal(1, 0, a.data(), 64);
  philox_normal(2, 0, b.data(), 64);
  philox_normal(1, 1, c.data(), 64);
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
}

TEST(Philox, StandardNormalMoments) {
  const int n = 200000;
  std::vector<float> v(n);
  philox_normal(123, 5, v.data(), n);
  double m = 0, m2 = 0, m4 = 0;
  for (float x : v) m += x;
  m /= n;
  for (float x : v) {
    m2 += (x - m) * (x - m);
    m4 += std::pow(x - m, 4);
  }
  m2 /= n;
  m4 /= n;
  EXPECT_NEAR(m, 0.0, 0.01);
  EXPECT_NEAR(m2, 1.0, 0.015);
  EXPECT_NEAR(m4 / (m2 * m2), 3.0, 0.06);  // kurtosis of a Gaussian
}
