"""A GGUF SentencePiece vocabulary (tokenizer.ggml.model = llama: Llama 1/2, Mistral v0.1) splits
text as SentencePiece itself does. The oracle is a real SentencePiece BPE model trained here with
Llama's settings (identity normalization, a dummy space prefix, split digits, byte fallback),
written as llama.cpp's converter writes it: pieces, scores and token types."""

import random

import pytest
import sentencepiece as spm

from lmzoo.formats.tokenizer import Tokenizer

TEXTS = ["Hello world", "  two  spaces and\nnew lines\n\n", "digits 1234567 and 3.14", "héllo wörld ✓",
         "你好, 世界", "emoji 🙂 and ZWJ 👩‍💻", "tab\there", "", " leading space", "trailing space ",
         "a'b \"quoted\" (parens) [brackets]", "Die Straße ist groß."]


def corpus(n=3000, seed=0) -> str:
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from it an be this are have which or one had "
             "not but what all were when we there can your said use each she how their if will up other about "
             "many then them these so some her would make like him into time has look two more write go see "
             "number no way could people my than first water been call who oil its now find long down day did "
             "get come made may part hello world straße groß café naïve").split()
    lines = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 99999)}"
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines)


def train_sentencepiece(root):
    """A 600-piece SentencePiece BPE model trained with Llama's settings on corpus(), in `root`."""
    (root / "corpus.txt").write_text(corpus(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "m"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(root / "m.model"))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def gguf_vocabulary(sp) -> dict:
    """What convert_hf_to_gguf.py writes for a tokenizer.model: pieces, scores, and ggml's token types."""
    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
    n = sp.get_piece_size()
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_vocabulary_splits_as_sentencepiece(sentencepiece_model):
    sp = sentencepiece_model
    ours = Tokenizer.from_gguf_metadata(gguf_vocabulary(sp), "spm")
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    for text in TEXTS + corpus(50, seed=1).split("\n"):
        assert ours.encode(text) == [1, *sp.encode(text)], text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_vocabulary_is_written_back_as_read(sentencepiece_model):
    meta = gguf_vocabulary(sentencepiece_model)
    assert Tokenizer.from_gguf_metadata(meta, "spm").gguf_metadata() == meta


def test_sentencepiece_vocabulary_needs_its_scores(sentencepiece_model):
    import lmzoo

    meta = gguf_vocabulary(sentencepiece_model)
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(lmzoo.LmzooError, match="tokenizer.ggml.scores must give one score per token"):
        Tokenizer.from_gguf_metadata(meta, "spm")
