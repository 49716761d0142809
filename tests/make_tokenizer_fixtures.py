#!/usr/bin/env python3
"""Make the reference data that tests/tokenizer.rs checks lift's tokenizer against.

Run by hand (not by CI), from the repository root, with a Python that has
`tokenizers`, `transformers` and `gguf` installed:

    /opt/refenv/bin/python tests/make_tokenizer_fixtures.py

It needs the training text in /work/shared/datasets (math and commonsense JSON,
never copied into the repo) and, for the SmolLM2 part, the GGUF file
/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf (not in git either). Both
paths can be changed with --datasets and --gguf.

What it writes (all small, all committed):

  tests/data/tokenizer/<name>/tokenizer.json   four tokenizers trained here with
      Hugging Face `tokenizers` (vocab 1500), one per family lift supports, and
      two variants of them:
        gpt2           ByteLevel pre-tokenizer (GPT-2 regex), ByteLevel decoder
        llama3         Split(Llama-3 regex, isolated) + ByteLevel(use_regex=false),
                       ignore_merges=true, as Meta's Llama-3 tokenizer.json has
        smollm         Digits(individual) + ByteLevel, as SmolLM's has
        sentencepiece  BPE with byte fallback and <0xXX> byte tokens, normalizer
                       Prepend("▁") + Replace(" ", "▁"), decoder Replace /
                       ByteFallback / Fuse / Strip, as Llama-2's tokenizer.json has
        gpt2_prefix    gpt2 with ByteLevel(add_prefix_space=true)
        metaspace      sentencepiece with the Metaspace pre-tokenizer (split at
                       every ▁) and decoder instead of the legacy normalizer
      The gpt2 one also has added tokens with lstrip / rstrip / single_word, the
      sentencepiece one a normalized added token.
  tests/data/tokenizer/<name>_gguf/vocab.json   the llama3 and sentencepiece
      vocabularies as a GGUF file would store them (tokens, token types, scores,
      merges; the sentencepiece one without merges, like Llama-2 GGUFs), loaded
      for reference by transformers' own GGUF tokenizer import
  tests/data/tokenizer/expected.json   for every input string: the ids each
      tokenizer gives (no BOS) and what decoding those ids gives back; also the
      ids of the real SmolLM2-135M tokenizer as transformers builds it from the
      GGUF ("smollm2_gguf"), and as SmolLM2's own tokenizer.json / llama.cpp
      would give them, digits isolated first ("smollm2_gguf_digits"; see the
      note in smollm2() below).

With --fuzz N (and --seed S) it writes nothing to the repo; instead it makes N
random strings, adds the inputs above and three whole dataset files, and writes
their reference encodings to /tmp/lift_tokenizer_fuzz.json together with the
SmolLM2 GGUF vocabulary, for the by-hand check

    LIFT_TOKENIZER_FUZZ=/tmp/lift_tokenizer_fuzz.json \
        cargo test --release --test tokenizer -- --ignored --nocapture
"""

import argparse
import glob
import json
import os
import random
import sys
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import AddedToken

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "tokenizer")
CORPUS = os.path.join(REPO, "tests", "data", "tokenizer_corpus.txt")

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens every fixture gets; "<think>" is added as a plain (non-special) token.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PLAIN_ADDED = "<think>"

VOCAB_SIZE = 1500


def training_text(datasets):
    """A few hundred KB of English: math word problems and commonsense questions."""
    texts = []
    with open(os.path.join(datasets, "math", "math_train_3k.json")) as f:
        for ex in json.load(f)[:1200]:
            texts.append(ex["instruction"] + "\n" + ex["output"])
    for path in sorted(glob.glob(os.path.join(datasets, "commonsense", "*.json"))):
        with open(path) as f:
            for ex in json.load(f)[:120]:
                texts.append(ex["instruction"] + "\n" + ex["output"])
    return texts


def train_byte_level(texts, pre_tokenizer):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(PLAIN_ADDED, special=False, normalized=False)])
    return tok


def train_gpt2(texts):
    tok = train_byte_level(texts, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    # Added tokens with the matching options tokenizers has: lstrip/rstrip swallow
    # the whitespace beside them, single_word only matches outside words.
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True), AddedToken("<eot>", rstrip=True)])
    tok.add_tokens([AddedToken("<word>", single_word=True, normalized=False)])
    return tok


def gpt2_prefix(gpt2):
    """GPT-2 with add_prefix_space: every piece of text gets a leading space."""
    tok = Tokenizer.from_str(gpt2.to_str())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    return tok


def metaspace(sentencepiece):
    """The sentencepiece vocabulary with the Metaspace pre-tokenizer (split at
    every ▁) and decoder instead of the legacy normalizer."""
    tok = Tokenizer.from_str(sentencepiece.to_str())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always"), decoders.Fuse()]
    )
    return tok


def train_llama3(texts):
    tok = train_byte_level(
        texts,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    )
    # Meta's tokenizer.json sets ignore_merges: a pre-token that is itself in the
    # vocabulary is taken whole, without running the merges.
    j = json.loads(tok.to_str())
    j["model"]["ignore_merges"] = True
    return Tokenizer.from_str(json.dumps(j))


def train_smollm(texts):
    return train_byte_level(
        texts,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
    )


def train_sentencepiece(texts):
    """A Llama-2 style tokenizer: ▁ for spaces, merges over characters, and a byte
    token <0xXX> for every byte so that any character can be spelled."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits at spaces like SentencePiece does (no merge across words);
    # the finished tokenizer, like Llama-2's, has no pre-tokenizer at all.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SP_SPECIALS + byte_tokens,
        limit_alphabet=120,  # leave rare characters to byte fallback
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    j = json.loads(tok.to_str())
    # The byte tokens are ordinary vocabulary entries in Llama-2, not added tokens
    # (text that spells "<0x41>" is not turned into byte 0x41).
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] not in byte_tokens]
    tok = Tokenizer.from_str(json.dumps(j))
    tok.add_tokens([AddedToken(PLAIN_ADDED, special=False, normalized=False)])
    # A normalized added token is matched in the normalized text, so here only
    # after a space (its pattern is "▁<nt>").
    tok.add_tokens([AddedToken("<nt>", special=False, normalized=True)])
    return tok


def inputs():
    """The strings every tokenizer encodes: each corpus line, the whole corpus,
    special tokens in context, and edge cases."""
    with open(CORPUS, encoding="utf-8") as f:
        corpus = f.read()
    lines = corpus.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    specials = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n391<|im_end|>\n",
        "<s>Hello</s>",
        "Hello<s>world</s>again",
        " <s> spaced </s> ",
        "<|im_start|><|im_start|><|im_end|>",
        "<|im_start",
        "<|endoftext|>The end.<|endoftext|>",
        "<think>step by step</think>",
        "a <think> b",
        "x<think>y",
        "<unk> and <0x41> written out",
        "<<|im_end|>>",
        "x <mask> y",
        "a \n <mask>",
        "<mask><mask> <mask>",
        "<eot>  next",
        "x<eot>\n\ny",
        "<word> a<word>b <word>x",
        "_<word> é<word> .<word>.",
        "say <nt> now",
        "<nt>",
        " <nt>",
        "hello <nt>world<nt>",
    ]
    edge = [
        "",
        " ",
        "  ",
        "\n",
        "\t",
        "   x",
        "x   ",
        "\r\n",
        "a\r\nb\r\n\r\nc",
        " \n \n ",
        "\n\n3. Then 4",
        "x  1 and y   22",
        "12345678901234567890",
        "3.14159265358979 and -0.5e+10",
        "٣٤٥ ½ ² ③ Ⅻ",
        "non\u00a0breaking\u3000ideographic\u2003em",
        "zero\u200bwidth",
        "'S 'LL 'Ve 'D 'M 'T 'RE",
        "don't DON'T x'sy '",
        "e\u0301 combining, ﬁ ligature",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
        "\x00\x01\x7f control",
        "a" * 300,
        " " * 50 + "end",
        "\n" * 7,
        "ab" * 100 + " " + "12" * 50,
        "Ġ Ċ ▁ are not spaces",
        "😀😀😀😀",
    ]
    return lines + [corpus] + specials + edge


def encode_all(tok, strings):
    """Ids (no BOS: there is no post-processor) and the default decode (special
    tokens kept, as `decode(ids)` does)."""
    ids = [tok.encode(s, add_special_tokens=False).ids for s in strings]
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    return {"ids": ids, "decoded": decoded}


def gguf_vocab(tok, model, pre, with_merges):
    """The vocabulary as llama.cpp's convert script would store it in a GGUF."""
    j = json.loads(tok.to_str())
    vocab = dict(j["model"]["vocab"])
    added = {t["content"]: t for t in j["added_tokens"]}
    for t in j["added_tokens"]:
        vocab[t["content"]] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    types, scores = [], []
    for i, t in enumerate(tokens):
        if t in added:
            types.append(3 if added[t]["special"] else 4)
        elif t.startswith("<0x") and len(t) == 6:
            types.append(6)
        else:
            types.append(1)
        # SentencePiece scores: earlier merges score higher.
        scores.append(0.0 if types[-1] != 1 else -float(i))
    if model == "llama":
        types[tokens.index("<unk>")] = 2
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]] if with_merges else []
    bos = tokens.index("<s>") if "<s>" in tokens else tokens.index("<|im_start|>")
    eos = tokens.index("</s>") if "</s>" in tokens else tokens.index("<|im_end|>")
    return {
        "model": model,
        "pre": pre,
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "scores": scores,
        "bos_id": bos,
        "eos_id": eos,
        "add_bos": model == "llama",
    }


def load_via_gguf(v, arch):
    """Write `v` into a (tensor-less) GGUF file and let transformers import its
    tokenizer, exactly as it would a real model's."""
    import gguf
    from transformers import AutoTokenizer

    d = tempfile.mkdtemp()
    w = gguf.GGUFWriter(os.path.join(d, "t.gguf"), arch)
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["token_types"])
    w.add_token_scores(v["scores"])
    if v["merges"]:
        w.add_token_merges(v["merges"])
    w.add_bos_token_id(v["bos_id"])
    w.add_eos_token_id(v["eos_id"])
    w.add_add_bos_token(v["add_bos"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return AutoTokenizer.from_pretrained(d, gguf_file="t.gguf").backend_tokenizer


def smollm2(gguf_path):
    """The real SmolLM2-135M tokenizer, as transformers imports it from the GGUF.

    Note: transformers maps tokenizer.ggml.pre = "smollm" to the plain GPT-2
    ByteLevel pre-tokenizer, while SmolLM2's own tokenizer.json (and llama.cpp)
    isolate every digit first. The two differ on runs of two or more spaces or
    newlines before a digit ("\\n\\n3": Ċ Ċ 3 against ĊĊ 3). We record both.
    """
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    backend = t.backend_tokenizer
    digits = Tokenizer.from_str(backend.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return t, backend, digits


def smollm2_vocab(gguf_path):
    """tokens / token types / merges straight from the GGUF metadata."""
    import gguf

    r = gguf.GGUFReader(gguf_path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    return {
        "model": bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode(),
        "pre": bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode(),
        "tokens": strings("tokenizer.ggml.tokens"),
        "token_types": types,
        "merges": strings("tokenizer.ggml.merges"),
        "scores": [],
        "bos_id": scalar("tokenizer.ggml.bos_token_id"),
        "eos_id": scalar("tokenizer.ggml.eos_token_id"),
        "add_bos": bool(scalar("tokenizer.ggml.add_bos_token")),
    }


def random_strings(n, seed=1234):
    """Strings made to hit the corners: mixed scripts, digits, whitespace runs,
    apostrophes, emoji, special tokens, rare code points."""
    rng = random.Random(seed)
    pieces = [
        "the", " the", "The", " quick", "brown", "fox", "Hello", "world", "don't", "'s", "'LL", "'ve",
        "café", "naïve", "Zürich", "Ελληνικά", "русский", "中文", "学习", "日本語", "한국어", "😀", "👍🏽",
        "👨‍👩‍👧", "🇫🇷", "∑", "√", "≈", "€", "¥", "½", "²", "٣", "Ⅻ", "𝔘", "\u0301", "\u200b", "\u00a0",
        "\u3000", "\u2028", "\x0b", "\x0c", "\x85", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>",
        "</s>", "<think>", "<0x0A>", "<unk>", "Ġ", "▁", "Ċ", "<mask>", "<eot>", "<word>", "<nt>", " <nt>",
    ]
    # Short strings over a few characters the regexes treat differently.
    tricky = [" ", " ", "\n", "\t", "\r", "\u00a0", "\u3000", "1", "2", "a", "A", "s", "'", "é", "\u0301", "<", ">", "|", ".", "中", "😀", "▁", "_"]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append("".join(rng.choice(tricky) for _ in range(rng.randint(1, 12))))
            continue
        parts = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.3:
                parts.append(rng.choice(pieces))
            elif r < 0.45:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 25))))
            elif r < 0.65:
                parts.append(rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n", "\n ", "      "]))
            elif r < 0.8:
                parts.append(rng.choice(".,;:!?'\"-()[]{}<>/\\|@#$%^&*+=~`_"))
            elif r < 0.9:
                parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(1, 12))))
            else:
                # any code point but surrogates
                c = rng.randint(0, 0x10FFFF)
                while 0xD800 <= c <= 0xDFFF:
                    c = rng.randint(0, 0x10FFFF)
                parts.append(chr(c))
        out.append("".join(parts))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="/work/shared/datasets")
    ap.add_argument("--gguf", default="/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--fuzz", type=int, default=0, help="write N random cases to /tmp/lift_tokenizer_fuzz.json")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random cases")
    args = ap.parse_args()

    fixtures = {}
    if args.fuzz:
        for name in ["gpt2", "llama3", "smollm", "sentencepiece", "gpt2_prefix", "metaspace"]:
            fixtures[name] = Tokenizer.from_file(os.path.join(OUT, name, "tokenizer.json"))
    else:
        texts = training_text(args.datasets)
        print(f"training on {sum(len(t) for t in texts)} characters", file=sys.stderr)
        fixtures["gpt2"] = train_gpt2(texts)
        fixtures["llama3"] = train_llama3(texts)
        fixtures["smollm"] = train_smollm(texts)
        fixtures["sentencepiece"] = train_sentencepiece(texts)
        fixtures["gpt2_prefix"] = gpt2_prefix(fixtures["gpt2"])
        fixtures["metaspace"] = metaspace(fixtures["sentencepiece"])
        for name, tok in fixtures.items():
            os.makedirs(os.path.join(OUT, name), exist_ok=True)
            tok.save(os.path.join(OUT, name, "tokenizer.json"), pretty=False)

    gguf_vocabs = {
        "llama3_gguf": (gguf_vocab(fixtures["llama3"], "gpt2", "llama-bpe", True), "llama"),
        "sentencepiece_gguf": (gguf_vocab(fixtures["sentencepiece"], "llama", "default", False), "llama"),
    }
    if not args.fuzz:
        for name, (v, _) in gguf_vocabs.items():
            os.makedirs(os.path.join(OUT, name), exist_ok=True)
            with open(os.path.join(OUT, name, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump(v, f, ensure_ascii=False)
    for name, (v, arch) in gguf_vocabs.items():
        fixtures[name] = load_via_gguf(v, arch)

    strings = inputs()
    if args.fuzz:
        strings += random_strings(args.fuzz, args.seed)
        # Natural text at length: whole dataset files, JSON escapes, indentation and all.
        for path in ["math/math_train_3k.json", "math/gsm8k_test.json", "commonsense/piqa_test.json"]:
            with open(os.path.join(args.datasets, path), encoding="utf-8") as f:
                strings.append(f.read())
    result = {"inputs": strings, "tokenizers": {}}
    for name, tok in fixtures.items():
        result["tokenizers"][name] = encode_all(tok, strings)

    if os.path.exists(args.gguf):
        t, backend, digits = smollm2(args.gguf)
        result["smollm2_gguf"] = encode_all(backend, strings)
        # transformers' own encode must agree with its backend (no BOS for SmolLM2).
        assert result["smollm2_gguf"]["ids"] == [t.encode(s) for s in strings]
        result["smollm2_gguf_digits"] = encode_all(digits, strings)
        if args.fuzz:
            result["smollm2_vocab"] = smollm2_vocab(args.gguf)
    else:
        print(f"{args.gguf} not found: no SmolLM2 reference written", file=sys.stderr)

    path = "/tmp/lift_tokenizer_fuzz.json" if args.fuzz else os.path.join(OUT, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=None)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
