"""Tokenizers behind one interface: SentencePiece models we train, and GPT-2 byte-level BPE (HF BART checkpoints).

Both give BART's special ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; `<mask>` is id 4 in models we train,
50264 in the GPT-2 vocabulary of the released checkpoints) and the same methods:

    tok.encode(text) -> [0, ..., 2]             tok.encode_batch(texts) -> [[...], ...]
    tok.decode(ids) -> str                       tok.decode_batch(batch) -> [str, ...]
    tok.word_start_table() -> bool [vocab_size]  tok.save(dir)
    load_tokenizer(path)                         train_tokenizer(texts_or_files, vocab_size, out_dir)

Both objects pickle (the model bytes travel), so grain worker processes can tokenize.
CLI: `bart-jax tokenizer train|encode|decode ...` (bart_jax.cli.data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np

SPM_MODEL_FILE = "tokenizer.model"
GPT2_VOCAB_FILE = "vocab.json"
GPT2_MERGES_FILE = "merges.txt"
SPECIAL_PIECES = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
# SentencePiece skips training "sentences" longer than this (bytes); paragraphs of real documentation can be
# long, so allow more than the library default (4192).
_SPM_MAX_SENTENCE_BYTES = 32768


class SentencePieceTokenizer:
    """A SentencePiece model with BART's special ids (see `train_tokenizer`)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        mask = self._sp.piece_to_id(SPECIAL_PIECES["mask"])
        if mask == self._sp.unk_id():
            raise ValueError("SentencePiece model has no '<mask>' piece; train it with train_tokenizer")
        self._mask_id = int(mask)
        n = self._sp.get_piece_size()
        self._special_ids = frozenset(
            i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i) or i == self._mask_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls(data)
        except RuntimeError:  # SentencePiece's parse failure
            raise ValueError(f"{os.fspath(path)}: not a SentencePiece tokenizer model; give a tokenizer.model file "
                             "or a directory holding tokenizer.model or vocab.json + merges.txt") from None

    def __getstate__(self):
        return {"model_proto": self._model_proto}

    @property
    def fingerprint(self) -> str:
        """Identity by content (the serialized model): equal fingerprints encode text alike."""
        return "spm:" + hashlib.sha256(self._model_proto).hexdigest()[:16]

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    pad_id = property(lambda self: int(self._sp.pad_id()))
    bos_id = property(lambda self: int(self._sp.bos_id()))
    eos_id = property(lambda self: int(self._sp.eos_id()))
    unk_id = property(lambda self: int(self._sp.unk_id()))
    mask_id = property(lambda self: self._mask_id)
    vocab_size = property(lambda self: int(self._sp.get_piece_size()))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`: `[<s>, ..., </s>]` with specials, else the bare pieces."""
        return self._sp.encode(text, out_type=int, add_bos=add_special_tokens, add_eos=add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over a list (SentencePiece's C++ thread pool does the work)."""
        return self._sp.encode(list(texts), out_type=int, add_bos=add_special_tokens,
                               add_eos=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (list or 1-D array). Specials are dropped, or rendered as their pieces."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece renders control pieces as '', so render every piece by hand: '▁' is a space (except
        # the dummy prefix of the first text piece) and byte-fallback pieces '<0xNN>' are raw UTF-8 bytes.
        out, at_start = bytearray(), True
        for i in ids:
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                out.append(int(piece[1:-1], 16))
            elif i in self._special_ids:
                out += piece.encode("utf-8")
                continue
            else:
                text = piece.replace("\u2581", " ")
                out += (text[1:] if at_start and text.startswith(" ") else text).encode("utf-8")
            at_start = False
        return out.decode("utf-8", errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def word_start_table(self) -> np.ndarray:
        """bool [vocab_size]: True where a token starts a word ('▁' prefix) and for special tokens."""
        table = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            table[i] = i in self._special_ids or self._sp.id_to_piece(i).startswith("\u2581")
        return table

    def sentence_end_ids(self, split: str = "punctuation") -> tuple[int, ...]:
        """Ids of the tokens that end a sentence for the noise's sentence permutation. split
        'punctuation': pieces made only of '.', '!', '?' ('...', '▁.' ...); 'full_stop': only the piece
        '.' (fairseq's BART recipe, see NoiseConfig.sentence_split)."""
        return tuple(i for i in range(self.vocab_size)
                     if i not in self._special_ids and not self._sp.is_byte(i)
                     and _is_sentence_end(self._sp.id_to_piece(i), "\u2581", split))

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `tokenizer.model` into `directory`; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SPM_MODEL_FILE)
        with open(path, "wb") as f:
            f.write(self._model_proto)
        return path


def _is_sentence_end(token: str, space: str, split: str) -> bool:
    """Whether `token` (`space` marks a leading space) ends a sentence under NoiseConfig.sentence_split."""
    if split == "full_stop":
        return token == "."
    if split != "punctuation":
        raise ValueError(f"unknown sentence split {split!r}; expected 'punctuation' or 'full_stop'")
    text = token.lstrip(space)
    return bool(text) and set(text) <= set(".!?")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Gpt2BpeTokenizer:
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (the Hugging Face BART checkpoints' tokenizer).

    Special ids come from vocab.json (`<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`); like HF's BartTokenizer,
    no prefix space is added and `<mask>` swallows the space before it.
    """

    def __init__(self, vocab_json: bytes, merges_txt: bytes):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        self._vocab_json, self._merges_txt = bytes(vocab_json), bytes(merges_txt)
        vocab = json.loads(self._vocab_json.decode("utf-8"))
        missing = [p for p in SPECIAL_PIECES.values() if p not in vocab]
        if missing:
            raise ValueError(f"{GPT2_VOCAB_FILE} lacks special tokens {missing}")
        merges = []
        for line in self._merges_txt.decode("utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            left, right = line.split()
            merges.append((left, right))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(p, special=True, lstrip=(name == "mask"), normalized=False)
                                for name, p in SPECIAL_PIECES.items()])
        self._tok = tok
        self._ids = {name: int(vocab[p]) for name, p in SPECIAL_PIECES.items()}
        self._vocab = vocab
        self._vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Gpt2BpeTokenizer":
        with open(os.path.join(directory, GPT2_VOCAB_FILE), "rb") as f:
            vocab_json = f.read()
        with open(os.path.join(directory, GPT2_MERGES_FILE), "rb") as f:
            merges_txt = f.read()
        return cls(vocab_json, merges_txt)

    def __getstate__(self):
        return {"vocab_json": self._vocab_json, "merges_txt": self._merges_txt}

    @property
    def fingerprint(self) -> str:
        """Identity by content (vocab.json and merges.txt): equal fingerprints encode text alike."""
        return "bpe:" + hashlib.sha256(self._vocab_json + b"\0" + self._merges_txt).hexdigest()[:16]

    def __setstate__(self, state):
        self.__init__(state["vocab_json"], state["merges_txt"])

    pad_id = property(lambda self: self._ids["pad"])
    bos_id = property(lambda self: self._ids["bos"])
    eos_id = property(lambda self: self._ids["eos"])
    unk_id = property(lambda self: self._ids["unk"])
    mask_id = property(lambda self: self._ids["mask"])
    vocab_size = property(lambda self: self._vocab_size)

    def _wrap(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else list(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`: `[<s>, ..., </s>]` with specials, else the bare tokens."""
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over a list (the Rust library parallelizes it)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_special_tokens) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch],
                                      skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def word_start_table(self) -> np.ndarray:
        """bool [vocab_size]: True where a token starts a word ('Ġ', an encoded space, first) and for specials."""
        space = _bytes_to_unicode()[ord(" ")]
        table = np.zeros(self.vocab_size, dtype=bool)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            table[i] = token.startswith(space)
        table[list(self._ids.values())] = True
        return table

    def sentence_end_ids(self, split: str = "punctuation") -> tuple[int, ...]:
        """Ids of the tokens that end a sentence for the noise's sentence permutation. split
        'punctuation': tokens made only of '.', '!', '?' ('Ġ.', '...' ...); 'full_stop': only the token
        '.' (GPT-2 id 13, where fairseq's BART recipe splits; see NoiseConfig.sentence_split)."""
        space = _bytes_to_unicode()[ord(" ")]
        specials = set(self._ids.values())
        return tuple(sorted(i for token, i in self._tok.get_vocab(with_added_tokens=True).items()
                            if i not in specials and _is_sentence_end(token, space, split)))

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `vocab.json` and `merges.txt` (byte-identical to the inputs) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        for name, data in ((GPT2_VOCAB_FILE, self._vocab_json), (GPT2_MERGES_FILE, self._merges_txt)):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        return str(directory)


Tokenizer = SentencePieceTokenizer | Gpt2BpeTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer: a SentencePiece `.model` file, or a directory holding `tokenizer.model` or
    `vocab.json` + `merges.txt` (e.g. a converted Hugging Face BART checkpoint directory)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer.from_file(path)
    if os.path.isfile(os.path.join(path, SPM_MODEL_FILE)):
        return SentencePieceTokenizer.from_file(os.path.join(path, SPM_MODEL_FILE))
    if all(os.path.isfile(os.path.join(path, f)) for f in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE)):
        return Gpt2BpeTokenizer.from_directory(path)
    raise FileNotFoundError(
        f"no tokenizer at {path!r}: expected a .model file, or a directory with {SPM_MODEL_FILE} "
        f"or {GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE}")


def _training_lines(texts_or_files: Iterable[str] | str) -> Iterable[str]:
    """Non-empty lines of the given texts, or of the documents in the given files (txt/jsonl/gz)."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item
                                             and os.path.isfile(item)):
            from bart_jax.data.readers import iter_text_documents

            texts = iter_text_documents(os.fspath(item))
        else:
            texts = [item]
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line


@contextlib.contextmanager
def _sentencepiece_errors(vocab_size: int):
    """SentencePiece's trainer fails with RuntimeError on text it cannot use; say what to change instead."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        most = re.search(r"value <= (\d+)", text)
        if most:
            raise ValueError(f"vocabulary size {vocab_size} is more than SentencePiece can make of this text "
                             f"(at most {most.group(1)} pieces); ask for fewer or give more text") from None
        chars = re.search(r"smaller than required_chars\. \d+ vs (\d+)", text)
        if chars:
            raise ValueError(f"vocabulary size {vocab_size} is less than the {chars.group(1)} distinct characters "
                             "(and special pieces) of this text; ask for a larger vocabulary") from None
        if "sentences_.empty()" in text:
            raise ValueError(f"no line of the text is shorter than {_SPM_MAX_SENTENCE_BYTES} bytes, and "
                             "SentencePiece trains on lines: break the text into lines or documents") from None
        raise ValueError(f"SentencePiece could not train on this text: {text.strip()}") from None


def train_tokenizer(texts_or_files: Iterable[str] | str, vocab_size: int, out_dir: str | os.PathLike,
                    *, max_training_lines: int = 2_000_000, character_coverage: float = 0.99995,
                    seed: int = 0, num_threads: int | None = None) -> SentencePieceTokenizer:
    """Trains a SentencePiece BPE model with byte fallback and BART's special ids; saves it to `out_dir`.

    texts_or_files: an iterable of documents (str), or of paths to text corpus files (.txt/.jsonl/.gz,
    read like the `text_corpus` dataset). Each line is one training sentence; at most
    `max_training_lines` randomly sampled lines are used, which bounds time and memory on large corpora.
    Ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4 (user-defined, so it is matched in text).
    """
    import sentencepiece as spm

    if vocab_size < 256 + 5 + 1:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs 256 + 5 specials")
    with tempfile.TemporaryDirectory() as tmp:
        # A file (not sentence_iterator) so the sampling below happens in C++ without a Python callback.
        corpus = os.path.join(tmp, "corpus.txt")
        n_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for line in _training_lines(texts_or_files):
                f.write(line.replace("\r", " ") + "\n")
                n_lines += 1
        if n_lines == 0:
            raise ValueError("train_tokenizer: no text to train on (all inputs empty); give a corpus with text")
        spm.set_random_generator_seed(seed)  # the line sampling is the only randomness
        with _sentencepiece_errors(vocab_size):
            spm.SentencePieceTrainer.train(
                input=corpus, model_prefix=os.path.join(tmp, "sp"), model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, character_coverage=character_coverage, split_digits=True,
                bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                bos_piece=SPECIAL_PIECES["bos"], pad_piece=SPECIAL_PIECES["pad"],
                eos_piece=SPECIAL_PIECES["eos"], unk_piece=SPECIAL_PIECES["unk"],
                user_defined_symbols=[SPECIAL_PIECES["mask"]],
                input_sentence_size=max_training_lines, shuffle_input_sentence=True, seed_sentencepiece_size=
                1_000_000, max_sentence_length=_SPM_MAX_SENTENCE_BYTES,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
        tokenizer = SentencePieceTokenizer.from_file(os.path.join(tmp, "sp.model"))
    tokenizer.save(out_dir)
    return tokenizer
