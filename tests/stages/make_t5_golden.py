#!/usr/bin/env python3
"""Makes a tiny T5 text-encoder reference folder (Imagen / DeepFloyd IF's text encoder) with transformers, for the
GoldenT5 tests:

    python3 tests/stages/make_t5_golden.py --out DIR [--seed 0]
    DIFFPIPE_GOLDEN_T5=DIR ./build/tests/test_stages --gtest_filter='GoldenT5.*'

DIR/tokenizer/: a T5Tokenizer (Unigram, SentencePiece-style "▁" word boundaries, </s> appended, <pad> = 0) whose
vocabulary and scores were trained on a small caption corpus by the tokenizers library, saved as tokenizer.json
with an NFKC normalizer. DIR/text_encoder/: T5EncoderModel (T5 v1.1 layout: RMS layer norms, gated-GELU feed
forward without biases, relative position buckets in the first layer, no attention scaling), random weights.
DIR/golden.safetensors: tokenizer.input_ids / tokenizer.attention_mask (i64 [N, 77], padded as IF pads) for the
prompts in golden.json, and text_encoder.last_hidden_state [N, 77, D] (with that attention mask).
"""
import argparse
import json
import os
import random
import shutil

import torch

PROMPTS = ["a red circle on a blue square", "A small GREEN triangle,   top-left!", "",
           "ﬁve café crèmes — naïve Ⅻ", "zzqx unseen wordz 1234567", "photograph of an astronaut riding a horse",
           " ".join(["many words"] * 50), "emoji ✨🚀✨ run\tof\nspaces\u00a0and\u3000more",
           "a literal </s> and <unk> inside", "pre\u2581marked \u2581word", "ＦＵＬＬ width ＡＢＣ ½"]


def corpus(seed, clip_vocab):
    """Captions from a fixed word list: the alphabetic whole words of CLIP's BPE vocabulary (any English text
    would do; this one ships with the tiny-sd reference), a few accented ones, in random short sentences."""
    rng = random.Random(seed)
    words = sorted(w[:-4] for w in json.load(open(clip_vocab)) if w.endswith("</w>") and w[:-4].isalpha()
                   and w[:-4].isascii() and 2 <= len(w) - 4 <= 10)
    words = rng.sample(words, 1500) + ["café", "naïve", "crème", "über"]
    out = []
    for _ in range(6000):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        out.append(s.capitalize() if rng.random() < 0.3 else s)
    return out


def make_t5(tok_dir, enc_dir, seed, clip_vocab, d_model=32):
    """A T5Tokenizer (Unigram vocabulary trained on captions, NFKC) and a random T5EncoderModel (3 layers, 4 heads,
    gated-GELU), saved to tok_dir and enc_dir; returns both."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # a Unigram vocabulary with scores, trained as SentencePiece would split words ("▁" marks a word start)
    trainer_tok = Tokenizer(Unigram())
    trainer_tok.normalizer = normalizers.NFKC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = UnigramTrainer(vocab_size=2000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                             shrinking_factor=0.75, max_piece_length=8)
    trainer_tok.train_from_iterator(corpus(seed, clip_vocab), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]["vocab"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, s) for p, s in learned if p not in
                                                               ("<pad>", "</s>", "<unk>")]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(9, -1, -1)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=10, model_max_length=77)
    tok._tokenizer.normalizer = normalizers.NFKC()  # real T5 folders: a Precompiled (nmt_nfkc) charsmap
    tok.save_pretrained(tok_dir)

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=56, num_layers=3, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                   use_cache=False, pad_token_id=0, eos_token_id=1)
    enc = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    enc.save_pretrained(enc_dir)
    return tok, enc


def make_spiece(tok_dir, seed, clip_vocab):
    """A SentencePiece Unigram model (nmt_nfkc, pad 0, </s> 1, <unk> 2) trained by the sentencepiece package on the
    same captions, saved as tok_dir/spiece.model with a tokenizer_config.json and nothing else (DeepFloyd IF's
    layout); returns transformers' T5Tokenizer read from it, or None without sentencepiece/protobuf."""
    try:
        import google.protobuf  # noqa: F401  (transformers reads the charsmap with it)
        import sentencepiece as spm
    except ImportError:
        print("sentencepiece or protobuf missing: no spiece.model reference")
        return None
    from transformers import T5Tokenizer
    os.makedirs(tok_dir)
    text = os.path.join(tok_dir, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(corpus(seed, clip_vocab)) + "\n")
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(tok_dir, "spiece"), vocab_size=1000,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    for f in ("corpus.txt", "spiece.vocab"):
        os.remove(os.path.join(tok_dir, f))
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "model_max_length": 77, "extra_ids": 100}, f, indent=1)
    return T5Tokenizer.from_pretrained(tok_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--clip-vocab", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-sd",
                                                        "model", "tokenizer", "vocab.json"))
    a = ap.parse_args()
    import transformers
    from safetensors.torch import save_file

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    tok, enc = make_t5(os.path.join(a.out, "tokenizer"), os.path.join(a.out, "text_encoder"), a.seed, a.clip_vocab)

    t = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, add_special_tokens=True,
            return_tensors="pt")
    spiece = make_spiece(os.path.join(a.out, "spiece"), a.seed, a.clip_vocab)
    with torch.no_grad():
        h = enc(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state
    res = {"tokenizer.input_ids": t.input_ids.contiguous(), "tokenizer.attention_mask": t.attention_mask.contiguous(),
           "text_encoder.last_hidden_state": h.contiguous()}
    if spiece is not None:  # the same prompts through a spiece.model-only folder, as transformers reads it
        s = spiece(PROMPTS, padding="max_length", max_length=77, truncation=True, add_special_tokens=True,
                   return_tensors="pt")
        res.update({"spiece.input_ids": s.input_ids.contiguous(), "spiece.attention_mask": s.attention_mask.contiguous()})
    save_file(res, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "max_length": 77, "tokens": [tok.convert_ids_to_tokens(r) for r in
                                                             t.input_ids[:, :12].tolist()],
            "source": f"transformers {transformers.__version__} T5Tokenizer (tokenizers backend) + T5EncoderModel, "
                      f"torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    print(json.dumps(meta, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
