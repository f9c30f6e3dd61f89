// The quality evaluation behind `kvgate eval` (workers/eval) and its YAML quality table: setting
// names, table round trip and errors, evaluation-data loading, and the measurements on the
// committed reference model at a short context (fp16 against itself is exact; a coarser format
// distorts more than a finer one; a sliding window that drops the probe's header loses retrieval).

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "kvgate/kernels/kv_format.h"
#include "tests/unit/workers/model_test_util.h"
#include "workers/eval/quality_eval.h"
#include "workers/eval/quality_table.h"

namespace kvgate::eval {
namespace {

using kvgate::worker::testing::EnvOr;

std::string ModelDir() { return EnvOr("KVGATE_SOURCE_DIR", ".") + "/models/reference"; }

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          (name + "." + std::to_string(::getpid())))
      .string();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

TEST(EvalSettingTest, ParsesFormatAndEviction) {
  auto plain = ParseEvalSetting("tq3.5");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->name, "tq3.5");
  EXPECT_EQ(plain->spec.kind, kernels::KvFormatKind::kTurbo);
  EXPECT_EQ(plain->spec.eviction.kind, kernels::EvictionSpec::Kind::kNone);

  auto evict = ParseEvalSetting("fp16+sink:sinks=4,window=256");
  ASSERT_TRUE(evict.ok()) << evict.status();
  EXPECT_EQ(evict->spec.kind, kernels::KvFormatKind::kFp16);
  EXPECT_EQ(evict->spec.eviction.kind, kernels::EvictionSpec::Kind::kSink);
  EXPECT_EQ(evict->spec.eviction.window_tokens, 256);

  EXPECT_FALSE(ParseEvalSetting("fp12").ok());
  EXPECT_FALSE(ParseEvalSetting("fp16+lru:x=1").ok());
}

TEST(QualityTableTest, RoundTripsAndFinds) {
  QualityTable t;
  t.model = "models/reference";
  t.meta["date"] = "2026-11-29";
  QualityEntry a{.setting = "tq3.5", .context = 1024, .ppl = 4.2, .ppl_fp16 = 4.1,
                 .ppl_ratio = 4.2 / 4.1, .ppl_ratio_ci95 = 0.004, .kl = 0.0125, .top1 = 0.9375,
                 .retrieval = 0.75, .retrieval_fp16 = 0.8, .retrieval_ci95 = 0.03,
                 .retrieval_exact = 0.5, .retrieval_p = 0.6, .scored_tokens = 512, .windows = 8,
                 .probes = 8, .seconds = 12.5};
  QualityEntry b = a;
  b.context = 512;
  b.kl = 0.01;
  QualityEntry c = a;
  c.setting = "fp16+sink:sinks=4,window=256";
  c.retrieval_ci95 = std::nan("");  // one probe: no interval
  t.Put(a);
  t.Put(b);
  t.Put(c);
  const std::string path = TempPath("quality_table_test.yaml");
  ASSERT_TRUE(SaveQualityTable(t, path).ok());
  auto loaded = LoadQualityTable(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->model, "models/reference");
  EXPECT_EQ(loaded->meta.at("date"), "2026-11-29");
  ASSERT_EQ(loaded->settings, (std::vector<std::string>{"tq3.5", "fp16+sink:sinks=4,window=256"}));
  const QualityEntry* got = loaded->Find("tq3.5", 1024);
  ASSERT_NE(got, nullptr);
  EXPECT_NEAR(got->ppl_ratio, a.ppl_ratio, 1e-5);
  EXPECT_NEAR(got->kl, 0.0125, 1e-9);
  EXPECT_NEAR(got->top1, 0.9375, 1e-9);
  EXPECT_NEAR(got->retrieval, 0.75, 1e-9);
  EXPECT_EQ(got->scored_tokens, 512);
  EXPECT_NEAR(got->ppl_ratio_ci95, 0.004, 1e-9);
  EXPECT_NEAR(got->retrieval_fp16, 0.8, 1e-9);
  EXPECT_NEAR(got->retrieval_ci95, 0.03, 1e-9);
  EXPECT_TRUE(std::isnan(loaded->Find("fp16+sink:sinks=4,window=256", 1024)->retrieval_ci95));
  EXPECT_NEAR(loaded->Find("tq3.5", 512)->kl, 0.01, 1e-9);
  EXPECT_NE(loaded->Find("fp16+sink:sinks=4,window=256", 1024), nullptr);
  EXPECT_EQ(loaded->Find("tq3.5", 2048), nullptr);
  EXPECT_EQ(loaded->Find("kivi2", 1024), nullptr);
  std::remove(path.c_str());
}

TEST(QualityTableTest, ReportsMissingAndMalformedFiles) {
  EXPECT_EQ(LoadQualityTable("/nonexistent/quality.yaml").status().code(),
            absl::StatusCode::kNotFound);
  const std::string path = TempPath("quality_table_bad.yaml");
  WriteFile(path, "formats:\n  tq4:\n    512: {kl: 0.1}\n");  // lacks ppl_ratio, top1, retrieval
  auto bad = LoadQualityTable(path);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("ppl_ratio"), std::string::npos) << bad.status();
  WriteFile(path, "formats: [1, 2\n");
  EXPECT_EQ(LoadQualityTable(path).status().code(), absl::StatusCode::kInvalidArgument);
  std::remove(path.c_str());
}

TEST(EvalDataTest, LoadsIdsAndRejectsMalformedJson) {
  const std::string path = TempPath("eval_data.json");
  WriteFile(path, R"({"files": [{"path": "a.py", "ids": [0, 5, 6]}, {"ids": [0, 7]}]})");
  auto data = LoadEvalData(path, nullptr);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->files.size(), 2u);
  EXPECT_EQ(data->files[0], (std::vector<int32_t>{0, 5, 6}));
  WriteFile(path, R"({"files": [{"ids": [0, "x"]}]})");
  EXPECT_EQ(LoadEvalData(path, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  WriteFile(path, "not json");
  EXPECT_EQ(LoadEvalData(path, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  std::remove(path.c_str());
}

class ReferenceQualityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(ModelDir() + "/config.json")) {
      GTEST_SKIP() << "models/reference not present";
    }
    auto data = LoadEvalData(ModelDir() + "/eval/heldout_ids.json", nullptr);
    ASSERT_TRUE(data.ok()) << data.status();
    QualityOptions opts{.windows = 2, .score_tokens = 24, .probes = 3, .num_threads = 2};
    auto evaluator = QualityEvaluator::Create(ModelDir(), std::move(*data), opts);
    ASSERT_TRUE(evaluator.ok()) << evaluator.status();
    evaluator_ = std::move(*evaluator);
  }

  QualityEntry Measure(const std::string& setting, int context) {
    auto s = ParseEvalSetting(setting);
    EXPECT_TRUE(s.ok()) << s.status();
    int calls = 0, last_total = 0;
    auto e = evaluator_->Evaluate(*s, context, [&](int done, int total) {
      ++calls;
      last_total = total;
      EXPECT_LE(done, total);
    });
    EXPECT_TRUE(e.ok()) << e.status();
    EXPECT_GT(calls, 0);
    EXPECT_GT(last_total, 0);
    return e.ok() ? *e : QualityEntry{};
  }

  std::unique_ptr<QualityEvaluator> evaluator_;
};

TEST_F(ReferenceQualityTest, Fp16AgainstItselfIsExact) {
  const QualityEntry e = Measure("fp16", 160);
  EXPECT_EQ(e.scored_tokens, 2 * 24);
  EXPECT_NEAR(e.ppl_ratio, 1.0, 1e-6);  // the baseline keeps log-probabilities as float
  EXPECT_LT(e.kl, 1e-6);
  EXPECT_EQ(e.top1, 1.0);
  EXPECT_GT(e.ppl, 1.0);
  EXPECT_EQ(e.probes, 3);
  // Identical runs: every paired difference is zero (up to the float baseline), so are the
  // intervals.
  EXPECT_EQ(e.retrieval, e.retrieval_fp16);
  EXPECT_NEAR(e.ppl_ratio_ci95, 0.0, 1e-6);
  EXPECT_EQ(e.retrieval_ci95, 0.0);
}

TEST_F(ReferenceQualityTest, IntervalsMeasureTheSpreadOfPairedDifferences) {
  const QualityEntry e = Measure("kivi2", 160);
  // kivi2 moves every window's log-likelihood by a different amount: a positive, finite
  // interval, narrower than the ratio itself.
  EXPECT_GT(e.ppl_ratio_ci95, 0.0);
  EXPECT_LT(e.ppl_ratio_ci95, e.ppl_ratio);
  EXPECT_TRUE(std::isfinite(e.retrieval_ci95));
  EXPECT_GE(e.retrieval_ci95, 0.0);
  const QualityEntry fp16 = Measure("fp16", 160);
  EXPECT_EQ(e.retrieval_fp16, fp16.retrieval) << "the baseline's probes are fp16's own";
}

TEST_F(ReferenceQualityTest, BatchingChangesNothingButSpeed) {
  auto data = LoadEvalData(ModelDir() + "/eval/heldout_ids.json", nullptr);
  ASSERT_TRUE(data.ok()) << data.status();
  QualityOptions one{.windows = 2, .score_tokens = 24, .probes = 3, .num_threads = 2, .batch = 1};
  auto serial = QualityEvaluator::Create(ModelDir(), std::move(*data), one);
  ASSERT_TRUE(serial.ok()) << serial.status();
  auto setting = ParseEvalSetting("tq3");
  ASSERT_TRUE(setting.ok());
  auto a = (*serial)->Evaluate(*setting, 160, nullptr);
  ASSERT_TRUE(a.ok()) << a.status();
  const QualityEntry b = Measure("tq3", 160);  // the fixture's default batch: all 3 at once
  EXPECT_NEAR(a->ppl, b.ppl, 1e-4 * b.ppl);
  // Batched products sum in another order (BLAS blocking by row count): KL, a small difference
  // of nearly equal distributions, moves in its fourth digit; the predictions do not.
  EXPECT_NEAR(a->kl, b.kl, 2e-3 * b.kl);
  EXPECT_EQ(a->top1, b.top1);
  EXPECT_EQ(a->retrieval, b.retrieval);
  EXPECT_EQ(a->retrieval_fp16, b.retrieval_fp16);
  EXPECT_EQ(a->scored_tokens, b.scored_tokens);
}

TEST_F(ReferenceQualityTest, CoarserFormatsDistortMore) {
  const QualityEntry int8 = Measure("int8", 160);
  const QualityEntry kivi2 = Measure("kivi2", 160);
  EXPECT_GT(int8.kl, 0);
  EXPECT_LT(int8.kl, kivi2.kl);
  EXPECT_GE(int8.top1, kivi2.top1);
}

TEST_F(ReferenceQualityTest, SlidingWindowPastTheHeaderLosesRetrieval) {
  const QualityEntry full = Measure("fp16", 256);
  const QualityEntry window = Measure("fp16+sink:sinks=1,window=32", 256);
  EXPECT_GT(full.retrieval_p, 0.2) << "the model should recall a literal 256 tokens back";
  EXPECT_LT(window.retrieval_p, full.retrieval_p / 2);
  EXPECT_GT(window.kl, 0);
}

TEST_F(ReferenceQualityTest, RejectsContextsOutsideTheModel) {
  auto s = ParseEvalSetting("fp16");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(evaluator_->Evaluate(*s, 4096, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(evaluator_->Evaluate(*s, 16, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::eval
