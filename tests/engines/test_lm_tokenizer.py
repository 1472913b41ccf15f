"""Our byte-level BPE against known GPT-2 ids and against the HF `tokenizers` library built
from the same vocabulary files (GPT-2) and the same GGUF metadata (SmolLM2)."""

from __future__ import annotations

import json

import pytest
import tokenizers
from gguf import GGUFReader
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engines.lm.tokenizer import Tokenizer, bytes_to_unicode, gpt2_vocab_files
from service.engines.lm.weights import default_gguf_path, gguf_metadata

SAMPLES = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers 12345 and 3.14159, dates 2024-05-01.",
    "It's they're we've I'm you'll he'd",
    "naïve café, Ærøskøbing, Zürich; ¿qué tal? ¡olé!",
    "Emoji 🌍🚀 and flags 🇫🇷, math ∑ x² ≤ ∞",
    "中文 日本語のテキスト 한국어 Ελληνικά русский",
    "tabs\tand\nnewlines\n\n\r\nmixed   \n  ",
    "code: def f(x):\n    return x**2  # comment",
    "<|endoftext|>special in the middle<|endoftext|>",
]

text_without_surrogates = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")),
                                  max_size=60)


def hf_byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str],
                      split_digits: bool) -> tokenizers.Tokenizer:
    """The reference: HF's Rust BPE with GPT-2's byte-level pre-tokeniser."""
    reference = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    reference.decoder = tokenizers.decoders.ByteLevel()
    reference.add_special_tokens(specials)
    return reference


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def gpt2_reference() -> tokenizers.Tokenizer:
    encoder, merges_file = gpt2_vocab_files()
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in merges_file.read_text(encoding="utf-8").splitlines()[1:] if line]
    return hf_byte_level_bpe(vocab, merges, ["<|endoftext|>"], split_digits=False)


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (" the", [262]),
    ("The", [464]),
    ("\n\n", [628]),
    ("<|endoftext|>", [50256]),
])
def test_gpt2_known_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_special_ids(gpt2):
    assert gpt2.eos_token_id == 50256 and gpt2.vocab_size == 50257


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_matches_hf_tokenizers(gpt2, gpt2_reference, text):
    assert gpt2.encode(text) == gpt2_reference.encode(text, add_special_tokens=False).ids
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=text_without_surrogates)
def test_gpt2_random_text_matches_reference_and_round_trips(gpt2, gpt2_reference, text):
    ids = gpt2.encode(text)
    assert ids == gpt2_reference.encode(text, add_special_tokens=False).ids
    assert gpt2.decode(ids) == text


def test_incremental_decoding_never_splits_a_character(gpt2):
    text = "naïve 🌍🚀 世界 🇫🇷!"
    ids = gpt2.encode(text)
    decoder = gpt2.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some tokens end mid-character and had to wait
    assert len(ids) > len(text.split())


def test_incremental_decoding_flushes_a_dangling_byte(gpt2):
    lead_byte_of_emoji = gpt2.vocab[bytes_to_unicode()[0xF0]]
    decoder = gpt2.incremental_decoder()
    assert decoder.push(lead_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"


@pytest.fixture(scope="module")
def smollm2_metadata() -> dict:
    return gguf_metadata(GGUFReader(default_gguf_path()))


def test_smollm2_tokenizer_matches_hf_tokenizers(smollm2_metadata):
    meta = smollm2_metadata
    ours = Tokenizer.from_gguf_metadata(meta)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    reference = hf_byte_level_bpe({t: i for i, t in enumerate(tokens)},
                                  [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]],
                                  [t for t, kind in zip(tokens, types) if kind == 3], split_digits=True)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    for text in [*SAMPLES, "<|im_start|>user\nWhat is 1234 + 5678?<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
    assert ours.encode("12") == [ours.vocab["1"], ours.vocab["2"]]  # digits are split one by one
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert tokens[ours.eos_token_id] == "<|im_end|>"
    assert not ours.add_bos


def test_smollm2_chat_template(smollm2_metadata):
    ours = Tokenizer.from_gguf_metadata(smollm2_metadata)
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    ids = ours.encode(prompt)
    assert ids.count(ours.special_tokens["<|im_start|>"]) == 3  # system, user, assistant
