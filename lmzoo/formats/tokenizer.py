"""Text <-> token ids, chat templates and streaming decode, for a Hugging Face directory or a GGUF file.

The heavy lifting is done by the `tokenizers` library; this module only decides how to assemble it
(GGUF files carry a vocabulary, not a `tokenizer.json`) and reproduces what transformers does around it:
when BOS is added, which special tokens the chat template sees, and how the template is rendered.
"""

import json
import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from ..errors import LmzooError
from .chat_template import compile_template, render
from .hf import read_json_file

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokens that close a chat turn; generation must stop on them even when the model's eos is another token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

# Pre-tokenizer split patterns, as written in the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex, None meaning GPT-2's built-in one; split every digit first; NFC; ignore_merges).
# "smollm"/"starcoder" isolate each digit before the GPT-2 regex, as llama.cpp does ("\p{N}" then the GPT-2 regex)
# and as their tokenizer.json does (Digits(individual_digits=True) then ByteLevel).
_PRE_TOKENIZERS = {
    "gpt-2": (None, False, False, False),
    "smollm": (None, True, False, False),
    "starcoder": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False, True),
    "llama3": (_LLAMA3_SPLIT, False, False, True),
    "qwen2": (_QWEN2_SPLIT, False, True, False),
    # GLM-4's: Llama 3's split; glm4 (GLM-4-0414, GLM-4.5) also ignores merges, chatglm-bpe (GLM-4-9B) does not
    "glm4": (_LLAMA3_SPLIT, False, False, True),
    "chatglm-bpe": (_LLAMA3_SPLIT, False, False, False),
}


def _byte_level_backend(metadata: dict, tokens: list, types: list, source: str) -> _Backend:
    """GPT-2's byte-level BPE (tokenizer.ggml.model = gpt2) with the file's pre-tokenizer."""
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise LmzooError(f"{source}: tokenizer.ggml.pre is {pre!r}, an unknown pre-tokenizer; "
                         f"supported: {sorted(_PRE_TOKENIZERS)}")
    if not metadata.get("tokenizer.ggml.merges"):
        raise LmzooError(f"{source}: tokenizer.ggml.merges is missing; a byte-level BPE tokenizer needs it")
    # Ordinary tokens must be spelled in the byte alphabet for BPE to produce them; some converters store
    # them as raw text, so respell those. Control (3) and user-defined (4) tokens are matched whole by the
    # added-token pass, so they keep their raw text.
    to_char = _byte_to_char()
    alphabet = set(to_char.values())
    vocab = {}
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type not in (3, 4) and not set(token) <= alphabet:
            token = "".join(to_char[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    backend = _Backend(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=_PRE_TOKENIZERS[pre][3]))
    backend.pre_tokenizer, backend.normalizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(metadata: dict, tokens: list, types: list, source: str) -> _Backend:
    """SentencePiece's BPE (tokenizer.ggml.model = llama: Llama 1/2, Mistral v0.1), as transformers
    builds it from a tokenizer.model: pieces spelled with '▁' for spaces, a space put in front of
    the text, unknown characters as their UTF-8 bytes (the <0xXX> tokens), and the merges recovered
    from the scores: a piece that two pieces concatenate into is a merge, ranked by its score."""
    scores = metadata.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise LmzooError(f"{source}: tokenizer.ggml.scores must give one score per token for a SentencePiece "
                         f"vocabulary (it has {len(scores or [])} for {len(tokens)} tokens)")
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = []
    for piece, index in vocab.items():
        if types[index] not in (1, 4) or len(piece) < 2:  # normal and user-defined pieces are merge results
            continue
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(scores[index], pair) for pair in pairs]
    merges.sort(key=lambda m: -m[0])  # stable: pairs of one piece keep their order
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = _Backend(models.BPE(vocab, [pair for _, pair in merges], unk_token=unk, fuse_unk=True,
                                  byte_fallback=True))
    space = "\u2581"
    prefix = [normalizers.Prepend(space)] if metadata.get("tokenizer.ggml.add_space_prefix", True) else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", space)])
    backend.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return backend


def _pre_tokenizer(pre: str):
    """(pre-tokenizer, normalizer) that llama.cpp's pre-tokenizer `pre` stands for."""
    split, digits, nfc, _ = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:  # GPT-2's regex is built into ByteLevel
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps), normalizers.NFC() if nfc else None


def _signature(spec: dict | None) -> list:
    """What decides how a tokenizer.json pre-tokenizer (and normalizer) splits text, flattened."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [s for step in spec.get("pretokenizers", spec.get("normalizers", [])) for s in _signature(step)]
    pattern = spec.get("pattern")
    return [(spec.get("type"), pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else None,
             spec.get("individual_digits"), spec.get("use_regex"), spec.get("add_prefix_space"))]


def _pre_tokenizer_name(spec: dict) -> str:
    """The llama.cpp pre-tokenizer name whose splitting equals this tokenizer.json's (one of ours)."""
    theirs = (_signature(spec.get("pre_tokenizer")), _signature(spec.get("normalizer")),
              bool((spec.get("model") or {}).get("ignore_merges", False)))
    for pre, (_, _, _, ignore_merges) in _PRE_TOKENIZERS.items():
        backend = _Backend(models.BPE({}, []))
        backend.pre_tokenizer, backend.normalizer = _pre_tokenizer(pre)
        mine = json.loads(backend.to_str())
        if (_signature(mine["pre_tokenizer"]), _signature(mine["normalizer"]), ignore_merges) == theirs:
            return pre
    raise LmzooError("this tokenizer's pre-tokenizer matches none that llama.cpp names "
                     f"({', '.join(_PRE_TOKENIZERS)}), so it cannot be written to GGUF")


def _byte_to_char() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for themselves,
    # the 68 others are moved to U+0100 onwards in byte order, so that every token is printable text.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return table


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    return read_json_file(path)


class StreamDecoder:
    """Turns token ids into text one at a time, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = False):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        # Decode from a little before the new tokens, because some decoders (sentencepiece) drop a leading space.
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def _text(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def put(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._text(self._ids[self._prefix : self._read])
        text = self._text(self._ids[self._prefix :])
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest.
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        done = self._text(self._ids[self._prefix : self._read])
        text = self._text(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done) :]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, chat template and stop ids of one model.

    Whether BOS is added is decided by the backend's post-processor, as in transformers 5, which ignores
    tokenizer_config.json's add_bos_token when a tokenizer.json exists; `add_bos` reports what it does.
    """

    def __init__(self, backend: _Backend, special_tokens: dict, chat_template=None, extra_stop_ids=()):
        self._backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}  # name -> token text
        self.chat_template: str | None = chat_template
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            self.token_to_id(self.special_tokens.get(name)) for name in _SPECIAL_NAMES
        )
        self.add_bos: bool = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]
        turn_ends = [self.token_to_id(t) for t in _END_OF_TURN if chat_template and t in chat_template]
        stops = [self.eos_id, *turn_ends, *extra_stop_ids]
        self.stop_ids: list[int] = list(dict.fromkeys(int(i) for i in stops if i is not None))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._compiled = None
        self._controls: list[str] | None = None  # the control tokens' texts
        self._plain_backend = None  # the backend with special-token matching off (encode_plain)
        self._gguf_vocab: dict | None = None  # the tokenizer.* keys of the GGUF file it came from

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Special tokens written in the text (e.g. "<|im_end|>") become their ids, as in transformers:
        # for text the program wrote. Text from a user or a data file goes through encode_plain.
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` read as plain text: "<|im_end|>" written in it is spelled out in ordinary
        tokens, never the control token, so a user's text cannot end a turn or fake another's."""
        if not any(s in text for s in self._control_strings()):
            return self.encode(text, add_special_tokens)  # the same ids, without a second backend
        if self._plain_backend is None:
            self._plain_backend = _Backend.from_str(self._backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages, add_generation_prompt: bool = True, **extra) -> list[int]:
        """The chat rendered by its template, as ids. Only the template's own markup becomes control
        tokens: a control token's text inside a message stays plain text (encode_plain)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        ids, done = [], 0
        for start, end in self._control_strings_in_messages(messages, text):
            ids += self.encode(text[done:start], add_special_tokens=False)
            ids += self.encode_plain(text[start:end], add_special_tokens=False)
            done = end
        return ids + self.encode(text[done:], add_special_tokens=False)

    def _control_strings(self) -> list[str]:
        if self._controls is None:
            added = self._backend.get_added_tokens_decoder().values()
            self._controls = sorted((t.content for t in added if t.special and t.content), key=len, reverse=True)
        return self._controls

    def _control_strings_in_messages(self, messages, text: str) -> list[tuple[int, int]]:
        """Spans of `text` where a message's own text spells a control token. Each message's text
        is found where the template put it, in order; a template that rewrote such a text leaves
        no way to tell its markup from the message's, and is refused."""
        controls, spans, cursor = self._control_strings(), [], 0
        for i, m in enumerate(messages):
            content = m.get("content")
            parts = [content] if isinstance(content, str) else \
                [p.get("text") for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str)]
            for part in parts:
                if not any(c in part for c in controls):
                    continue
                at = text.find(part, cursor)
                if at < 0:
                    token = next(c for c in controls if c in part)
                    raise LmzooError(f"message {i} contains the control token {token!r} as text, and the chat "
                                     "template changes that message's text, so it cannot be kept plain")
                for c in controls:  # longest first, so "<|im_end|>" is not read as a shorter token inside it
                    k = part.find(c)
                    while k >= 0:
                        if not any(a <= at + k < b for a, b in spans):
                            spans.append((at + k, at + k + len(c)))
                        k = part.find(c, k + len(c))
                cursor = at + len(part)
        return sorted(spans)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise LmzooError("this model has no chat template; pass --raw to feed the prompt text as it is")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        # transformers drops None-valued keys (templates check for presence, not for None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **extra}  # caller's variables win, as in transformers
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return render(self._compiled, messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise LmzooError(f"{path}: no tokenizer.json; expected a Hugging Face model directory that contains one")
        try:
            backend = _Backend.from_file(tokenizer_file)
        except Exception as exc:  # the Rust error says what is wrong inside the file
            raise LmzooError(f"{tokenizer_file}: not a valid tokenizers file ({exc})") from exc
        config = _read_json(path, "tokenizer_config.json")
        special_map = _read_json(path, "special_tokens_map.json")
        special = {}
        for name in _SPECIAL_NAMES:
            value = config.get(name, special_map.get(name))
            value = value.get("content") if isinstance(value, dict) else value  # AddedToken as a dict
            if value is not None and not isinstance(value, str):
                raise LmzooError(f"{path}: tokenizer_config.json's {name} must be a token's text, not {value!r}")
            special[name] = value

        # Like transformers, a chat_template.jinja file takes precedence over the config's template.
        template = config.get("chat_template")
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") if isinstance(named.get("default"), str) else None
        if template is not None and not isinstance(template, str):
            raise LmzooError(f"{path}: tokenizer_config.json's chat_template must be text, "
                             f"not {type(template).__name__}")

        eos = _read_json(path, "generation_config.json").get("eos_token_id")
        extra_stops = eos if isinstance(eos, list) else [eos]
        return cls(backend, special, template, [i for i in extra_stops if isinstance(i, int)])

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str) -> "Tokenizer":
        kind = metadata.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise LmzooError(
                f"{source}: tokenizer.ggml.model is {kind!r}, which lmzoo cannot build; "
                "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)"
            )
        if not metadata.get("tokenizer.ggml.tokens"):
            raise LmzooError(f"{source}: tokenizer.ggml.tokens is missing; a GGUF vocabulary needs it")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise LmzooError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries but "
                             f"tokenizer.ggml.tokens has {len(tokens)}; they must match one to one")
        if kind == "gpt2":
            backend = _byte_level_backend(metadata, tokens, types, source)
        else:
            backend = _sentencepiece_backend(metadata, tokens, types, source)

        def token_at(key):
            index = metadata.get(key)
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

        special = {name: token_at(f"tokenizer.ggml.{key}_token_id")
                   for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding"), strict=True)}
        # Without these, "<|im_end|>" in a prompt would be cut into "<", "|", "im", ... instead of one id.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, token_type in zip(tokens, types, strict=True) if token_type == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, token_type in zip(tokens, types, strict=True) if token_type == 4])
        bos = special["bos_token"]
        # llama.cpp adds BOS by default for SentencePiece vocabularies, not for byte-level BPE ones
        if metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
            # The same template transformers builds for add_bos_token, so the saved tokenizer.json carries it.
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])],
            )
        # llama.cpp's end-of-turn / end-of-message ids, when the converter recorded them.
        extra_stops = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        extra_stops = [i for i in extra_stops if isinstance(i, int)]
        tokenizer = cls(backend, special, metadata.get("tokenizer.chat_template"), extra_stops)
        tokenizer._gguf_vocab = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
        return tokenizer

    def gguf_metadata(self, n_vocab: int | None = None) -> dict:
        """The `tokenizer.*` keys of a GGUF file (llama.cpp's vocabulary): kept as read from a GGUF
        file, or built from tokenizer.json for a byte-level BPE whose pre-tokenizer llama.cpp knows.
        llama.cpp sizes the embedding by the token list, so a model whose vocabulary is padded past
        the tokenizer's (n_vocab) gets "[PAD<id>]" tokens of type unused, as its converter writes."""
        out = dict(self._gguf_vocab) if self._gguf_vocab is not None else self._gguf_vocab_from_json()
        tokens = out["tokenizer.ggml.tokens"]
        n_vocab = n_vocab or len(tokens)
        if len(tokens) > n_vocab:
            raise LmzooError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary only {n_vocab}")
        if len(tokens) < n_vocab:
            pad = range(len(tokens), n_vocab)
            out["tokenizer.ggml.tokens"] = [*tokens, *(f"[PAD{i}]" for i in pad)]
            if "tokenizer.ggml.token_type" in out:
                out["tokenizer.ggml.token_type"] = [*out["tokenizer.ggml.token_type"], *(5 for _ in pad)]
            if "tokenizer.ggml.scores" in out:
                out["tokenizer.ggml.scores"] = [*out["tokenizer.ggml.scores"], *(-1000.0 for _ in pad)]
        return out

    def _gguf_vocab_from_json(self) -> dict:
        spec = json.loads(self._backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(spec.get("decoder"), dict) \
                or spec["decoder"].get("type") != "ByteLevel":
            raise LmzooError(f"this tokenizer ({model.get('type')} model, {(spec.get('decoder') or {}).get('type')} "
                             "decoder) cannot be written to GGUF yet: lmzoo writes byte-level BPE vocabularies")
        pre = _pre_tokenizer_name(spec)
        tokens = [None] * self.vocab_size
        for token, index in model["vocab"].items():
            tokens[index] = token
        types = [1] * self.vocab_size  # 1 normal, 3 control, 4 user-defined (llama.cpp's codes)
        for index, added in self._backend.get_added_tokens_decoder().items():
            tokens[index] = added.content
            types[index] = 3 if added.special else 4
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise LmzooError(f"this tokenizer has no token for ids {missing[:5]}; a GGUF vocabulary lists every id")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
               "tokenizer.ggml.add_bos_token": self.add_bos, "tokenizer.ggml.add_space_prefix": False}
        for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding"), strict=True):
            index = self.token_to_id(self.special_tokens.get(name))
            if index is not None:
                out[f"tokenizer.ggml.{key}_token_id"] = index
        turn_ends = [i for i in self.stop_ids if i != self.eos_id and i < self.vocab_size]
        if turn_ends:
            out["tokenizer.ggml.eot_token_id"] = turn_ends[0]
        if self.chat_template:
            out["tokenizer.chat_template"] = self.chat_template
        return out

    def save(self, out_dir) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by transformers' AutoTokenizer."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self._backend.save(os.path.join(out_dir, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            # For readers; transformers 5 takes BOS from tokenizer.json's post-processor instead.
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
