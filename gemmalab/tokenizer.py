"""Gemma tokenizer: SentencePiece BPE plus Gemma special tokens and the dialogue template.

Loads a SentencePiece ``tokenizer.model`` or rebuilds one from a GGUF vocabulary, encodes with
control-token text parsing that matches transformers, and trains new tokenizers with Gemma's settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemmalab.errors import GemmalabError
from gemmalab.files import open_text, read_jsonl

__all__ = ["Tokenizer", "TokenizerError", "train_tokenizer", "GEMMA_CHAT_TEMPLATE"]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(GemmalabError, ValueError):
    """A tokenizer file, field or input that cannot be used."""


# Jinja template equivalent to `Tokenizer.render_chat` (the Gemma 3 template, string contents only).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'model', 'assistant'] or "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_PieceType = sp_pb2.ModelProto.SentencePiece
_SPECIAL_TYPES = (_PieceType.CONTROL, _PieceType.UNKNOWN)


class Tokenizer:
    """SentencePiece tokenizer with Gemma special tokens and the Gemma dialogue template."""

    def __init__(self, proto_bytes: bytes, source: str = "<bytes>") -> None:
        proto = sp_pb2.ModelProto()
        sp = spm.SentencePieceProcessor()
        try:
            proto.ParseFromString(proto_bytes)
            sp.LoadFromSerializedProto(proto_bytes)
        except Exception as e:  # protobuf DecodeError / RuntimeError from SentencePiece
            raise TokenizerError(
                f"{source} is not a valid SentencePiece model (serialized ModelProto): {e}"
            ) from None
        self._proto_bytes, self._sp, self._source = proto_bytes, sp, source
        self.vocab_size: int = sp.get_piece_size()
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()
        self.start_of_turn_id: int = self.id_of("<start_of_turn>")
        self.end_of_turn_id: int = self.id_of("<end_of_turn>")
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.end_of_turn_id)
        # Control pieces (and <unk>) are what transformers treats as special tokens: their text is
        # matched in `encode(parse_special=True)` and rendered by `decode` as the piece text.
        self._special: dict[str, int] = {
            p.piece: i for i, p in enumerate(proto.pieces) if p.type in _SPECIAL_TYPES
        }
        self._special_ids = frozenset(self._special.values())
        self._special_lengths = sorted({len(s) for s in self._special}, reverse=True)
        first_chars = "".join(sorted({s[0] for s in self._special if s}))
        self._special_start = re.compile(f"[{re.escape(first_chars)}]") if first_chars else None

    def __reduce__(self):  # picklable (e.g. for DataLoader workers): rebuilt from the model bytes
        return (type(self), (self._proto_bytes, self._source))

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_proto(cls, data: bytes) -> Tokenizer:
        """Load from the bytes of a serialized SentencePiece ModelProto."""
        return cls(bytes(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` file (or a directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
        return cls(data, source=str(path))

    @classmethod
    def from_gguf(cls, reader_or_path) -> Tokenizer:
        """Build a SentencePiece BPE model from the vocabulary of a GGUF file (path or gguf.GGUFReader)."""
        from gemmalab.checkpoint.gguf import open_gguf

        if isinstance(reader_or_path, (str, os.PathLike)):
            source, reader = str(reader_or_path), open_gguf(reader_or_path)
        elif hasattr(reader_or_path, "fields"):  # an open gguf.GGUFReader: its fields are already parsed
            source = str(getattr(getattr(reader_or_path, "data", None), "filename", "<GGUFReader>"))
            reader = reader_or_path
        else:
            raise TokenizerError(f"from_gguf expects a path or gguf.GGUFReader, got {type(reader_or_path).__name__}")
        fields = {}
        for key, f in reader.fields.items():
            if key.startswith("tokenizer."):
                try:
                    fields[key] = f.contents()
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"GGUF file {source}: {key} holds text that is not UTF-8 ({e}).") from None

        def need(name: str, ok=None, what: str = ""):
            """The field `name`; with `ok`, a field that fails it is an error saying it must be `what`."""
            if name not in fields:
                raise TokenizerError(
                    f"GGUF file {source} has no tokenizer field '{name}'; it carries no usable vocabulary."
                )
            if ok is not None and not ok(fields[name]):
                raise TokenizerError(f"GGUF file {source}: {name} must be {what}, got {fields[name]!r:.80}.")
            return fields[name]

        def items(kinds: tuple[type, ...]):
            return lambda v: isinstance(v, list) and all(isinstance(x, kinds) and not isinstance(x, bool) for x in v)

        if need("tokenizer.ggml.model") != "llama":
            raise TokenizerError(
                f"GGUF file {source}: tokenizer.ggml.model is {fields['tokenizer.ggml.model']!r:.80}; "
                "only SentencePiece vocabularies ('llama', as used by Gemma) are supported."
            )
        tokens = need("tokenizer.ggml.tokens", items((str,)), "an array of strings")
        scores = need("tokenizer.ggml.scores", items((int, float)), "an array of numbers")
        types = need("tokenizer.ggml.token_type", lambda v: items((int,))(v) and all(1 <= t <= 6 for t in v),
                     "an array of SentencePiece piece types (1 to 6)")
        if not len(tokens) == len(scores) == len(types):
            raise TokenizerError(f"GGUF file {source}: tokens/scores/token_type arrays differ in length.")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        unk_id = need("tokenizer.ggml.unknown_token_id", whole, "a token id")
        for key in ("bos", "eos", "padding"):
            if f"tokenizer.ggml.{key}_token_id" in fields:
                need(f"tokenizer.ggml.{key}_token_id", whole, "a token id")

        proto = sp_pb2.ModelProto()
        for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
            typ = int(typ)
            if typ != _PieceType.BYTE:
                # GGUF writes whitespace-only user-defined pieces with literal spaces; SentencePiece
                # matches them against escaped text, so they must use U+2581 like normal pieces do.
                piece = piece.replace(" ", "\u2581")
            # SentencePiece needs exactly one UNKNOWN piece; Gemma 3's GGUF marks <unk> as control.
            proto.pieces.add(piece=piece, score=float(score), type=_PieceType.UNKNOWN if i == unk_id else typ)
        ts = proto.trainer_spec
        ts.model_type = sp_pb2.TrainerSpec.BPE
        ts.vocab_size = len(tokens)
        ts.byte_fallback = True
        ts.split_digits = True
        ts.allow_whitespace_only_pieces = True
        # SentencePiece finds special ids by piece text (defaults "<s>", "</s>"), so set both.
        for kind, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            i = int(fields.get(f"tokenizer.ggml.{key}_token_id", -1))
            if 0 <= i < len(tokens):
                setattr(ts, f"{kind}_id", i)
                setattr(ts, f"{kind}_piece", proto.pieces[i].piece)
            else:
                setattr(ts, f"{kind}_id", -1)
        ns = proto.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        return cls(proto.SerializeToString(), source=source)

    # ---- encoding / decoding ------------------------------------------------------------------

    def _split_special(self, text: str) -> list[str | int]:
        """Split `text` into plain-text segments and special-token ids (leftmost-longest match)."""
        if self._special_start is None:
            return [text] if text else []
        out: list[str | int] = []
        start = 0
        # Only positions holding a possible first character are probed, each with one dict lookup
        # per distinct special-token length, so thousands of <unusedN> tokens cost nothing extra.
        for m in self._special_start.finditer(text):
            i = m.start()
            if i < start:
                continue
            for n in self._special_lengths:  # longest first
                tid = self._special.get(text[i : i + n])
                if tid is not None:
                    break
            else:
                continue
            if i > start:
                out.append(text[start:i])
            out.append(tid)
            start = i + n
        if start < len(text):
            out.append(text[start:])
        return out

    def encode(self, text: str, bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS prepended if `bos` (never twice).

        parse_special=True turns control-token text such as "<start_of_turn>" into its id (as
        transformers does); use parse_special=False for untrusted text.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        lone = _LONE_SURROGATE.search(text)  # from JSON "\ud800" escapes: SentencePiece cannot take them
        if lone:
            raise TokenizerError(f"the text holds a lone surrogate (U+{ord(lone.group()):04X}) at character "
                                 f"{lone.start()}, which is not a character UTF-8 can encode")
        parts: list[str | int] = self._split_special(text) if parse_special else [text]
        encoded = iter(self._sp.encode([p for p in parts if isinstance(p, str)]))
        ids: list[int] = []
        for p in parts:
            if isinstance(p, int):
                ids.append(p)
            else:
                ids.extend(next(encoded))
        if bos and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; control tokens render as their text unless `skip_special`.

        Byte-fallback pieces are fused into UTF-8; each byte that is not part of a valid sequence
        becomes U+FFFD (SentencePiece's rule; transformers turns a whole invalid byte run into U+FFFDs).
        """
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise TokenizerError(f"token id out of range [0, {self.vocab_size}) in decode")
        if skip_special:  # dropped first, so bytes on both sides of a special token fuse (as in HF)
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        out: list[str] = []
        run: list[int] = []  # ordinary ids decoded together so byte-fallback pieces fuse into UTF-8
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    # ---- dialogue template ----------------------------------------------------------------------

    def _chat_parts(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str | int, bool]]:
        """The dialogue as text segments (untrusted) and special ids, per the Gemma 3 template, each with whether it
        belongs to a model turn's trained span (its "model\n" + content text, and its <end_of_turn>)."""
        if not isinstance(messages, (list, tuple)):  # a str or dict would be walked as if it were the list
            raise TokenizerError(f"apply_chat_template: messages must be a list of {{'role', 'content'}} dicts, got "
                                 f"{type(messages).__name__}")
        if not messages:
            raise TokenizerError("apply_chat_template: messages is empty")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "model", "assistant"):
                raise TokenizerError(
                    f"message {k}: expected {{'role': 'system'|'user'|'model'|'assistant', 'content': str}}, "
                    f"got {m!r:.200}"
                )
        prefix, first = "", 0
        if messages[0]["role"] == "system":
            # Gemma has no system role: it is prepended to the first user turn (not trimmed, as in HF).
            prefix, first = messages[0]["content"] + "\n\n", 1
            if len(messages) < 2:
                raise TokenizerError("message 0: a system message must be followed by a user message")
        parts: list[tuple[str | int, bool]] = [(self.bos_id, False)]
        for k in range(first, len(messages)):
            role = "model" if messages[k]["role"] == "assistant" else messages[k]["role"]
            expected = "user" if (k - first) % 2 == 0 else "model"
            if role != expected:
                raise TokenizerError(
                    f"message {k}: role {messages[k]['role']!r} where {expected!r} was expected; roles must "
                    "alternate user/model starting with user (a system message is only allowed first)"
                )
            body = role + "\n" + (prefix if k == first else "") + messages[k]["content"].strip()
            trained = role == "model"
            parts += [(self.start_of_turn_id, False), (body, trained), (self.end_of_turn_id, trained), ("\n", False)]
        if add_generation_prompt:
            parts += [(self.start_of_turn_id, False), ("model\n", False)]
        return parts

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a dialogue in the Gemma format, with exactly one BOS.

        Message contents are encoded as plain text, so a user typing "<end_of_turn>" cannot end a turn.
        """
        return self.chat_ids_and_mask(messages, add_generation_prompt)[0]

    def chat_ids_and_mask(self, messages: list[dict], add_generation_prompt: bool = False
                          ) -> tuple[list[int], list[bool]]:
        """`apply_chat_template`'s ids, and a mask that is True exactly on the tokens supervised fine-tuning learns to
        produce: the content of each model turn and its <end_of_turn> (not the BOS, user turns, the "model\n" header
        or the newline after <end_of_turn>). A model turn is encoded as one text ("model\n" + content, as the template
        writes it); should a token straddle the header's end, it is trained (it carries content)."""
        ids: list[int] = []
        mask: list[bool] = []
        for part, trained in self._chat_parts(messages, add_generation_prompt):
            if isinstance(part, int):
                ids.append(part)
                mask.append(trained)
                continue
            piece_ids = self.encode(part, bos=False, parse_special=False)
            header = self._header_tokens(piece_ids, "model\n") if trained else len(piece_ids)
            ids += piece_ids
            mask += [False] * header + [True] * (len(piece_ids) - header)
        return ids, mask

    def _header_tokens(self, ids: list[int], header: str) -> int:
        """How many leading tokens of `ids` (the encoding of header + content) lie wholly within `header`."""
        for n in range(1, len(ids) + 1):
            text = self._sp.decode(ids[:n])
            if len(text) >= len(header):
                return n if text == header else n - 1
        return len(ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of `apply_chat_template` (for display and debugging)."""
        parts = self._chat_parts(messages, add_generation_prompt)
        return "".join(self._sp.id_to_piece(p) if isinstance(p, int) else p for p, _ in parts)

    # ---- misc ---------------------------------------------------------------------------------

    def piece(self, id: int) -> str:
        """The SentencePiece piece of `id` (whitespace shown as U+2581)."""
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(id))

    def id_of(self, piece: str) -> int:
        """The id of `piece`; TokenizerError if the vocabulary has no such piece."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise TokenizerError(f"piece {piece!r} is not in the vocabulary of {self._source}")
        return i

    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized model (to check that token shards match)."""
        return hashlib.sha256(self._proto_bytes).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json (loadable by transformers)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._proto_bytes)
        special = {
            "bos_token": self._sp.id_to_piece(self.bos_id),
            "eos_token": self._sp.id_to_piece(self.eos_id),
            "unk_token": self._sp.id_to_piece(self.unk_id),
            "pad_token": self._sp.id_to_piece(self.pad_id),
        }
        config = {
            "tokenizer_class": "GemmaTokenizer",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "added_tokens_decoder": {
                str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for s, i in sorted(self._special.items(), key=lambda kv: kv[1])
            },
            "chat_template": GEMMA_CHAT_TEMPLATE,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---- training -------------------------------------------------------------------------------


def _iter_texts(files: Sequence[str | os.PathLike], max_bytes: int) -> Iterator[str]:
    """Texts from plain-text (one per line) or JSONL ("text" field) files, optionally gzipped.

    Texts over `max_bytes` are cut at line boundaries, since SentencePiece drops over-long sentences.
    """
    for f in files:
        p = Path(f)
        if p.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            for lineno, obj in read_jsonl(p):
                if not isinstance(obj.get("text"), str):
                    raise TokenizerError(f"{p}, line {lineno}: expected a JSON object with a string field 'text'.")
                yield from _chunk(obj["text"], max_bytes)
            continue
        try:
            with open_text(p) as fh:
                for line in fh:
                    yield from _chunk(line.rstrip("\r\n"), max_bytes)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise TokenizerError(f"cannot read training file {p}: {e}") from None


def _sample(texts: Iterator[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k texts (all of them if there are fewer), in their input order (reservoir sampling)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        if i < k:
            reservoir.append((i, text))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, text)
    return [text for _, text in sorted(reservoir)]


def _chunk(text: str, max_bytes: int) -> Iterator[str]:
    if len(text.encode("utf-8")) <= max_bytes:
        if text:
            yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if buf and size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:  # a single over-long line: hard cut (a character is at most 4 bytes)
            yield line[: max_bytes // 4]
            line = line[max_bytes // 4 :]
            n = len(line.encode("utf-8"))
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def train_tokenizer(
    input_files: list[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 0,
    extra_control_tokens: int = 0,
    seed: int = 0,
    threads: int = 8,
) -> Tokenizer:
    """Train a new tokenizer with Gemma's settings and save it to `out_dir`.

    BPE with split digits, byte fallback, whitespace kept as-is (no dummy prefix, no collapsing,
    identity normalization), ids pad 0 / eos 1 / bos 2 / unk 3, then control tokens <mask>,
    <start_of_turn>, <end_of_turn> and `extra_control_tokens` <unusedN>. Input files are plain text
    (one text per line) or JSONL with a "text" field (.jsonl / .jsonl.gz); .gz is decompressed.
    `input_sentence_size` > 0 trains on that many texts, sampled uniformly with `seed`.

    The model is a function of the texts, `seed` and `threads` only: SentencePiece's own sampling is not
    seeded, and its BPE merges depend on its thread count, so the sample is drawn here and the thread count is
    fixed (not the machine's core count) for the same tokenizer on every machine.
    """
    files = [Path(f) for f in input_files]
    if max_sentence_length < 64:
        raise TokenizerError(f"max_sentence_length {max_sentence_length} is too small (need >= 64 bytes)")
    if not files:
        raise TokenizerError("train_tokenizer: no input files given")
    for p in files:
        if not p.is_file():
            raise TokenizerError(f"training file {p} does not exist or is not a file")
    control = ["<mask>", "<start_of_turn>", "<end_of_turn>"] + [f"<unused{i}>" for i in range(extra_control_tokens)]
    minimum = 4 + len(control) + 256 + 1  # specials, control, byte pieces, at least one learned piece
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: byte fallback and special tokens need at least {minimum}"
        )
    texts = _iter_texts(files, max_sentence_length)
    if input_sentence_size > 0:
        texts = _sample(texts, input_sentence_size, seed)
    # Texts are streamed into SentencePiece. An exception in the iterator reaches us as a RuntimeError, so
    # remember the real one to re-raise it.
    seen: dict = {"texts": 0, "error": None}

    def feed() -> Iterator[str]:
        try:
            for text in texts:
                seen["texts"] += 1
                yield text
        except TokenizerError as e:
            seen["error"] = e
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            split_by_unicode_script=True,
            split_by_number=True,
            split_by_whitespace=True,
            treat_whitespace_as_suffix=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=control,
            max_sentence_length=max_sentence_length,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if seen["error"] is not None:
            raise seen["error"] from None
        if seen["texts"] == 0:
            raise TokenizerError(f"no text found in training files {[str(p) for p in files]}") from None
        raise TokenizerError(
            f"SentencePiece training on {[str(p) for p in files]} failed "
            f"(too little text for vocab_size {vocab_size}?): {e}"
        ) from None
    tok = Tokenizer(model.getvalue(), source=str(Path(out_dir) / "tokenizer.model"))
    tok.save(out_dir)
    return tok
