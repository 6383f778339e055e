#!/usr/bin/env python3
"""Write a tiny, deterministic BERT reranker GGUF for end-to-end tests.

Usage: python3 scripts/make_tiny_reranker.py OUT.gguf

No real reranking model can be downloaded in the test environment, so this
script builds one from scratch: a 2-layer BERT cross-encoder (n_embd 32) with a
WordPiece vocabulary of a few hundred tokens and a one-logit classification
head. The weights are random (fixed seed), so the scores mean nothing, but they
are finite and differ between documents, which is all the tests need.
llama.cpp loads the file with `--reranking` (pooling type RANK, served on
/v1/rerank); `--embedding --pooling mean` works on it too.

The file is about 0.2 MB. It needs only `gguf` (PyPI, written against 0.19.0)
and `numpy`; re-running the script gives a byte-identical file.

Layout, mirroring what llama.cpp's BERT loader (src/models/bert.cpp) and its
RANK pooling (llm_graph_context::build_pooling) expect:
  token_embd, token_types, position_embd, token_embd_norm.{weight,bias}
  blk.N.attn_{q,k,v}.{weight,bias}, blk.N.attn_output.{weight,bias}
  blk.N.attn_output_norm.{weight,bias}, blk.N.ffn_{up,down}.{weight,bias}
  blk.N.layer_output_norm.{weight,bias}
  cls.{weight,bias}                 dense + tanh over the [CLS] row
  cls.output.{weight,bias}          projection to the single relevance logit
"""

import sys

import numpy as np
import gguf

ARCH = "bert"
SEED = 20240607

N_EMBD = 32
N_HEAD = 2
N_LAYER = 2
N_FF = 64
N_CTX = 512  # also the size of the learned position table
N_TOKEN_TYPES = 2  # BERT "sentence A/B" embeddings; llama.cpp requires >= 1
LAYER_NORM_EPS = 1e-12

# Special tokens come first so their ids are small and fixed.
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL))

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# llama.cpp's WPM pre-tokenizer splits every ASCII punctuation/symbol character
# into a word of its own, so each gets a word-initial token.
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

# Whole words, so common text does not always fall back to letter-by-letter.
WORDS = """
the a an and or but not no yes of to in on at by for with from as into about
is are was were be been being am do does did have has had will would can could
should may might must shall it its this that these those there here what which
who whom whose when where why how all any some many much more most other such
only own same so than too very just also i you he she we they me him her us
them my your his our their one two three first new old good great big small
long little high low large last next few well up down out over under again
hello hi world panda bear cat dog animal giant red fox quick brown lazy jumps
time year day people way man woman child thing life work part place case week
company system program question number point home water room mother area money
story fact month lot right study book eye job word business issue side kind
head house service friend father power hour game line end member law car city
name president team minute idea kid body information back parent face others
level office door health person art war history party result change morning
reason research girl guy moment air teacher force education food river tree
computer data model server test query document search rank score text language
""".split()

# Continuation pieces ("##ing" in a BERT vocab.txt) for common suffixes.
SUFFIXES = ["s", "es", "ed", "ing", "er", "est", "ly", "ion", "tion", "ment", "ness", "able"]


def build_vocab():
    """Return (tokens, token_types) in llama.cpp's WPM spelling.

    llama.cpp stores BERT vocabularies the way convert_hf_to_gguf.py writes
    them: a word-initial piece carries a leading U+2581 ("phantom space")
    instead of nothing, and a continuation piece is stored without its "##".
    Control tokens keep their text as is.
    """
    tokens = list(SPECIAL)
    types = [gguf.TokenType.CONTROL] * len(SPECIAL)
    seen = set(tokens)

    def add(tok):
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)

    # Single characters both at a word start and as continuations: any ASCII
    # word then tokenizes (letter by letter at worst) instead of becoming [UNK].
    for ch in LETTERS + DIGITS:
        add("\u2581" + ch)
        add(ch)
    for ch in PUNCT:
        add("\u2581" + ch)
    for w in WORDS:
        add("\u2581" + w)
    for s in SUFFIXES:
        add(s)
    return tokens, types


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_reranker.py OUT.gguf")
    out = sys.argv[1]

    # RandomState's stream is frozen by NumPy, so the file is reproducible
    # across NumPy versions (unlike default_rng).
    rng = np.random.RandomState(SEED)

    def w(*shape, scale=0.2):
        # numpy shape is (rows, cols) = ggml's {ne0 = cols, ne1 = rows} reversed
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm_w():
        return (1.0 + rng.standard_normal(N_EMBD) * 0.05).astype(np.float32)

    tokens, types = build_vocab()
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(out, ARCH)  # also writes general.architecture

    # --- general / hyperparameters ---
    writer.add_name("llamapool tiny reranker (random weights)")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_causal_attention(False)
    # RANK pooling: take the [CLS] row, run the cls head, score = first logit.
    writer.add_pooling_type(gguf.PoolingType.RANK)
    # One label -> n_cls_out = 1 (also llama.cpp's default without the key).
    writer.add_classifier_output_labels(["LABEL_0"])

    # --- tokenizer ---
    writer.add_tokenizer_model("bert")  # llama.cpp: LLAMA_VOCAB_TYPE_WPM
    writer.add_tokenizer_pre("default")  # ignored for WPM, set for tidiness
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # bert.cpp refuses a model without a token type count.
    writer.add_token_type_count(N_TOKEN_TYPES)
    # The "bert" tokenizer's default special ids (101/100/102/0/103) are those
    # of the real 30k vocab and would hit ordinary tokens here: set them all.
    # There is no separate CLS id key any more: [CLS] is the BOS token.
    writer.add_bos_token_id(CLS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_sep_token_id(SEP_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_mask_token_id(MASK_ID)
    # Rerank prompt built by llama-server: [CLS] query [SEP] document
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_eos_token(False)
    # BertNormalizer: lowercase (and strip accents). This is llama.cpp's
    # default; written out because gguf-py has no helper for this key yet.
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", True)

    # --- tensors ---
    T = gguf.MODEL_TENSOR
    name = gguf.TENSOR_NAMES

    writer.add_tensor(name[T.TOKEN_EMBD] + ".weight", w(n_vocab, N_EMBD))
    writer.add_tensor(name[T.TOKEN_TYPES] + ".weight", w(N_TOKEN_TYPES, N_EMBD))
    writer.add_tensor(name[T.POS_EMBD] + ".weight", w(N_CTX, N_EMBD, scale=0.05))
    writer.add_tensor(name[T.TOKEN_EMBD_NORM] + ".weight", norm_w())
    writer.add_tensor(name[T.TOKEN_EMBD_NORM] + ".bias", w(N_EMBD, scale=0.02))

    for i in range(N_LAYER):
        def blk(t, suffix):
            return name[t].format(bid=i) + "." + suffix

        for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT):
            writer.add_tensor(blk(t, "weight"), w(N_EMBD, N_EMBD))
            writer.add_tensor(blk(t, "bias"), w(N_EMBD, scale=0.02))
        writer.add_tensor(blk(T.ATTN_OUT_NORM, "weight"), norm_w())
        writer.add_tensor(blk(T.ATTN_OUT_NORM, "bias"), w(N_EMBD, scale=0.02))
        writer.add_tensor(blk(T.FFN_UP, "weight"), w(N_FF, N_EMBD))
        writer.add_tensor(blk(T.FFN_UP, "bias"), w(N_FF, scale=0.02))
        writer.add_tensor(blk(T.FFN_DOWN, "weight"), w(N_EMBD, N_FF))
        writer.add_tensor(blk(T.FFN_DOWN, "bias"), w(N_EMBD, scale=0.02))
        writer.add_tensor(blk(T.LAYER_OUT_NORM, "weight"), norm_w())
        writer.add_tensor(blk(T.LAYER_OUT_NORM, "bias"), w(N_EMBD, scale=0.02))

    # Classification head (RoBERTa/BERT style): dense n_embd -> n_embd, tanh,
    # then out_proj n_embd -> 1.
    writer.add_tensor(name[T.CLS] + ".weight", w(N_EMBD, N_EMBD))
    writer.add_tensor(name[T.CLS] + ".bias", w(N_EMBD, scale=0.02))
    writer.add_tensor(name[T.CLS_OUT] + ".weight", w(1, N_EMBD, scale=1.0))
    writer.add_tensor(name[T.CLS_OUT] + ".bias", np.zeros(1, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out}: {n_vocab} tokens, {N_LAYER} layers, n_embd {N_EMBD}")


if __name__ == "__main__":
    main()
