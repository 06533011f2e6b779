#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/stages/model_writer.h"
#include "diffpipe/stages/tokenizer.h"
#include "test_util.h"

using namespace diffpipe;

TEST(Tokenizer, NormalizeUnescapesTwiceCollapsesAndLowercases) {
  EXPECT_EQ(ClipTokenizer::normalize("  A&amp;amp;B \t\n C&#233;&#x41;  "), "a&b céa");
  // Python's html.unescape, cases computed with it: '& &x € � � ¬it; � x'
  EXPECT_EQ(ClipTokenizer::html_unescape("&amp &ampx &#128; &#0; &#x110000; &notit; &#xd800; &#1;x"),
            "& &x \u20ac \ufffd \ufffd \u00acit; \ufffd x");
  EXPECT_EQ(ClipTokenizer::html_unescape("&unknown; &#; & &Eacute;&hearts;&NotNestedGreaterGreater;"),
            "&unknown; &#; & \u00c9\u2665\u2aa2\u0338");
  EXPECT_EQ(ClipTokenizer::normalize("ÄÖÜ ΣΑΣ"), "äöü σας");  // final sigma, as Python's str.lower()
}

TEST(Tokenizer, SplitFollowsClipPattern) {
  using V = std::vector<std::string>;
  EXPECT_EQ(ClipTokenizer::split("it's 42 o'clock!!"), (V{"it", "'s", "4", "2", "o", "'", "clock", "!!"}));
  EXPECT_EQ(ClipTokenizer::split("<|startoftext|>hi"), (V{"<|startoftext|>", "hi"}));
  EXPECT_EQ(ClipTokenizer::split("naïve café"), (V{"naïve", "café"}));
  EXPECT_EQ(ClipTokenizer::split("we'll they'd"), (V{"we", "'ll", "they", "'d"}));
}

TEST(Tokenizer, ByteLevelBpeWithMergesTruncationAndPadding) {
  const std::string dir = test::scratch_dir("tok");
  const int64_t n = write_clip_tokenizer(dir, {"r e", "re d</w>"});
  const auto tok = ClipTokenizer::load(dir);
  EXPECT_EQ(static_cast<int64_t>(tok.vocab_size()), n);
  // "red" -> r e d</w> -> re d</w> -> red</w>: one token
  auto ids = tok.encode_untruncated("red");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids.front(), tok.bos_id());
  EXPECT_EQ(ids.back(), tok.eos_id());
  // "ab": two byte symbols, the last with </w>; 'a' is byte 97 -> id 97, "b</w>" -> 256 + 98
  EXPECT_EQ(tok.encode_untruncated("ab"), (std::vector<int64_t>{tok.bos_id(), 97, 256 + 98, tok.eos_id()}));
  // 100 words: truncated to 76 + end token, padded otherwise
  std::string long_text;
  for (int i = 0; i < 100; ++i) long_text += "x ";
  auto t = tok.encode(long_text);
  ASSERT_EQ(t.size(), 77u);
  EXPECT_EQ(t[76], tok.eos_id());
  EXPECT_EQ(t[75], 256 + 'x');
  auto s = tok.encode("x");
  EXPECT_EQ(s[2], tok.eos_id());
  EXPECT_EQ(s[3], tok.pad_id());
  EXPECT_EQ(s[76], tok.pad_id());
}

TEST(Tokenizer, BadFilesNameTheFileAndLine) {
  const std::string dir = test::scratch_dir("tok-bad");
  write_clip_tokenizer(dir);
  {
    std::ofstream f(dir + "/merges.txt");
    f << "#version: 0.2\na b\nthree parts here\n";
  }
  try {
    ClipTokenizer::load(dir);
    FAIL() << "malformed merges accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("merges.txt:3"), std::string::npos) << e.what();
  }
  std::remove((dir + "/vocab.json").c_str());
  try {
    ClipTokenizer::load(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocab.json: file not found"), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, PadTokenFromConfig) {  // SD2 pads with "!" (id 0 in CLIP's vocabulary, 33 in this byte vocabulary)
  const std::string dir = test::scratch_dir("tok-pad");
  write_clip_tokenizer(dir);
  std::ofstream(dir + "/tokenizer_config.json") << R"({"bos_token":"<|startoftext|>","eos_token":"<|endoftext|>","pad_token":"!"})";
  const auto tok = ClipTokenizer::load(dir);
  EXPECT_EQ(tok.pad_id(), 33);
  EXPECT_EQ(tok.encode("a")[5], 33);
  EXPECT_NE(tok.pad_id(), tok.eos_id());
}
