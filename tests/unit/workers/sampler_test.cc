// The Sampler's pick apart from its random draw (SampleWithUniform, the algorithm device sampling
// reproduces), and the draws Sampler and NextDeviceSampling make: the same generator stream, so a
// request's tokens do not depend on whether the host or the device samples.
#include "workers/engine/sampler.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvgate::worker {
namespace {

int32_t Pick(const std::vector<float>& logits, float temperature, int top_k, float top_p,
             double uniform) {
  return SampleWithUniform(logits, temperature, top_k, top_p, uniform);
}

TEST(SampleWithUniformTest, GreedyTakesTheLowestIdOfTheMaxima) {
  EXPECT_EQ(Pick({1.0f, 3.0f, -2.0f, 3.0f}, 0.0f, 0, 1.0f, 0.7), 1);
  EXPECT_EQ(Pick({-INFINITY, -INFINITY}, 0.0f, 0, 1.0f, 0.0), 0);
}

TEST(SampleWithUniformTest, InverseCdfOverSortedCandidates) {
  // Equal logits: candidates in ascending id order, each 1/4 of the mass; uniform 0.3 -> the
  // cumulative mass 0.5 of the second candidate is the first to reach 0.3.
  const std::vector<float> flat = {0.5f, 0.5f, 0.5f, 0.5f};
  EXPECT_EQ(Pick(flat, 1.0f, 0, 1.0f, 0.0), 0);
  EXPECT_EQ(Pick(flat, 1.0f, 0, 1.0f, 0.3), 1);
  EXPECT_EQ(Pick(flat, 1.0f, 0, 1.0f, 0.5), 1) << "a cumulative mass equal to the draw is taken";
  EXPECT_EQ(Pick(flat, 1.0f, 0, 1.0f, std::nextafter(1.0, 0.0)), 3);
  // Sorted descending: id 2 (logit 9) first, then id 0, then id 1.
  const std::vector<float> logits = {1.0f, 0.0f, 9.0f};
  EXPECT_EQ(Pick(logits, 1.0f, 0, 1.0f, 0.0), 2);
  EXPECT_EQ(Pick(logits, 1.0f, 0, 1.0f, 0.99999), 1);
  // top_k = 2 keeps ids 2 and 0; the top draw then lands on id 0.
  EXPECT_EQ(Pick(logits, 1.0f, 2, 1.0f, 0.99999), 0);
  // The nucleus: id 2 holds > 99.9% of the mass, so top_p 0.99 keeps it alone.
  EXPECT_EQ(Pick(logits, 1.0f, 0, 0.99f, 0.99999), 2);
  // top_p 1 (and 0, "off") keep everything.
  EXPECT_EQ(Pick(logits, 1.0f, 0, 0.0f, 0.99999), 1);
}

TEST(SampleWithUniformTest, NonFiniteLogitsAreNeverPicked) {
  const std::vector<float> logits = {NAN, -INFINITY, 2.0f, INFINITY, 2.0f};
  for (double u : {0.0, 0.4, 0.6, 0.999}) {
    const int32_t id = Pick(logits, 1.0f, 0, 1.0f, u);
    EXPECT_TRUE(id == 2 || id == 4) << "uniform " << u << " picked " << id;
  }
  EXPECT_EQ(Pick({NAN, -INFINITY}, 1.0f, 0, 1.0f, 0.5), 0) << "no finite logit: token 0";
}

// Sample draws exactly what std::uniform_real_distribution<double>(0, 1) draws from the same
// mt19937_64 (the stream every seed produced before device sampling existed).
TEST(SamplerTest, SampleUsesTheSeededUniformStream) {
  const std::vector<float> logits = {0.3f, 1.0f, -0.5f, 0.9f, 0.0f, 2.0f, 1.9f};
  const SamplingConfig config{.temperature = 0.9f, .top_k = 5, .top_p = 0.9f, .seed = 42};
  Sampler sampler(config);
  std::mt19937_64 rng(config.seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(sampler.Sample(logits),
              Pick(logits, config.temperature, config.top_k, config.top_p, uniform(rng)))
        << "draw " << i;
  }
}

// NextDeviceSampling carries the parameters and the same draws as Sample; greedy draws nothing.
TEST(SamplerTest, NextDeviceSamplingConsumesTheStreamLikeSample) {
  const std::vector<float> logits = {0.3f, 1.0f, -0.5f, 0.9f, 0.0f, 2.0f, 1.9f};
  const SamplingConfig config{.temperature = 1.2f, .top_k = 0, .top_p = 0.8f, .seed = 9};
  Sampler host(config), device(config);
  for (int i = 0; i < 200; ++i) {
    const DeviceSampling d = device.NextDeviceSampling();
    EXPECT_EQ(d.temperature, config.temperature);
    EXPECT_EQ(d.top_k, config.top_k);
    EXPECT_EQ(d.top_p, config.top_p);
    EXPECT_GE(d.uniform, 0.0);
    EXPECT_LT(d.uniform, 1.0);
    EXPECT_EQ(host.Sample(logits), Pick(logits, d.temperature, d.top_k, d.top_p, d.uniform))
        << "draw " << i;
  }
  Sampler greedy({.seed = 9}), fresh({.temperature = 1.0f, .seed = 9});
  EXPECT_EQ(greedy.NextDeviceSampling().uniform, 0.0);
  EXPECT_EQ(greedy.DrawUniform(), fresh.DrawUniform()) << "greedy consumed a draw";
  // top_p 0 means off, as for Sample.
  EXPECT_EQ(Sampler({.temperature = 1.0f, .top_p = 0.0f}).NextDeviceSampling().top_p, 1.0f);
}

}  // namespace
}  // namespace kvgate::worker
