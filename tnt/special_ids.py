"""Special token ids (pad, bos, eos) that never take a real token's place (docs/design.md,
"Special ids").

TnT's own tokenizers reserve ids 0, 1, 2 for pad, bos and eos. A vocabulary made elsewhere (the
nGPT reference's GPT-2 ids, a Hugging Face tokenizer) has real tokens there: GPT-2's 0, 1, 2 are
`!`, `"`, `#`. So a model's special ids must come from its vocabulary, and this module

- refuses a pad, bos or eos id that is a real token of a tokenizer (`special_id_collisions`,
  written against the small tokenizer interface every TnT tokenizer has: `vocab_size`,
  `pad_id`/`bos_id`/`eos_id`, optional `special_ids` and `id_to_token`, else `decode`);
- reads the special tokens a Hugging Face `tokenizer.json` declares (`VocabularyFile`);
- decides, for an imported checkpoint, where bos and eos come from (`resolve_import_ids`): the
  caller, the checkpoint's `model_args`, a tokenizer file, the GPT-2 vocabulary the reference
  trains with, or nowhere (None). The pad is never a source id: import appends a row for it.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

NAMES = ("pad_id", "bos_id", "eos_id")
AUTO = "auto"  # import_reference's default: take the id from the source, see resolve_import_ids

GPT2_EOT = 50256  # GPT-2's `<|endoftext|>`: it both starts and ends a document
GPT2_VOCABS = (50257, 50304)  # GPT-2's vocabulary, and nanoGPT/nGPT's padding of it to 64*786
# Texts under which tokenizers commonly carry their special tokens, most specific first (the one
# table both the tokenizer and the import read). GPT-2 has only <|endoftext|>, which serves as
# both its bos and its eos.
ROLE_TOKENS = {
    "pad_id": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos_id": ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos_id": ("<eos>", "</s>", "[SEP]", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"),
}


class SpecialIdCollision(ValueError):
    """A pad, bos or eos id is a real token of the tokenizer (the message names id and token)."""


def _token_text(tokenizer, token_id: int) -> str:
    if hasattr(tokenizer, "id_to_token"):
        return str(tokenizer.id_to_token(token_id))
    return tokenizer.decode([token_id])


def special_id_collisions(ids: dict[str, int | None], tokenizer) -> list[str]:
    """One message per id in `ids` (name -> id or None) that is a real token of `tokenizer`: an
    id below its `vocab_size` that is none of its own special ids."""
    own = {getattr(tokenizer, n, None) for n in NAMES} | set(getattr(tokenizer, "special_ids", ()))
    return [f"{name}={i} is the tokenizer's real token {_token_text(tokenizer, i)!r}"
            for name, i in ids.items()
            if i is not None and 0 <= i < tokenizer.vocab_size and i not in own]


def check_special_ids(cfg, tokenizer, where: str = "the model") -> None:
    """Refuse a config (anything with pad_id/bos_id/eos_id) whose special ids are real tokens."""
    problems = special_id_collisions({n: getattr(cfg, n) for n in NAMES}, tokenizer)
    if problems:
        raise SpecialIdCollision(f"{where}'s special ids collide with its tokenizer: "
                                 + "; ".join(problems))


def tokenizer_special_ids(tokenizer) -> tuple[int, dict[str, int | None]]:
    """(the smallest model vocab_size, {pad_id, bos_id, eos_id}) for training with `tokenizer`:
    its own special ids (bos/eos may be None), and, when it has no pad, an appended pad id
    `tokenizer.vocab_size` that no real token uses (so the model needs one more id)."""
    ids = {n: getattr(tokenizer, n, None) for n in NAMES}
    if ids["pad_id"] is not None:
        return tokenizer.vocab_size, ids
    return tokenizer.vocab_size + 1, dict(ids, pad_id=tokenizer.vocab_size)


class VocabularyFile:
    """The vocabulary and special tokens of a Hugging Face `tokenizer.json`, read as JSON (no
    tokenizer library): enough to name tokens and find the special ids, not to encode text."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read tokenizer file {self.path}: {e}") from e
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
        if not isinstance(vocab, dict):
            raise ValueError(f"tokenizer file {self.path} has no model.vocab")
        added = data.get("added_tokens") or []
        self._text = {int(i): t for t, i in vocab.items()}
        self._text.update({int(a["id"]): a["content"] for a in added})
        self.vocab_size = max(self._text) + 1
        self.special_ids = sorted(int(a["id"]) for a in added if a.get("special"))
        by_text = {self._text[i]: i for i in self.special_ids}
        for name, texts in ROLE_TOKENS.items():
            setattr(self, name, next((by_text[t] for t in texts if t in by_text), None))

    def id_to_token(self, token_id: int) -> str | None:
        return self._text.get(token_id)


def resolve_import_ids(vocab_size: int, given: dict[str, int | None | str], model_args: dict,
                       vocab: VocabularyFile | None) -> tuple[dict[str, int | None], dict[str, str]]:
    """(ids, where each came from) for importing a checkpoint with `vocab_size` source ids.

    pad is `vocab_size`: a row appended to the embedding and lm_head that no source id uses.
    bos and eos, first that applies: the caller's value (an int, or None for no such token;
    `AUTO` means "from the source"); `model_args[name]`; the tokenizer file's special token for
    the role; GPT-2's `<|endoftext|>` (50256) when the vocabulary is GPT-2's size; else None.
    """
    if vocab is not None and vocab.vocab_size > vocab_size:
        raise ValueError(f"tokenizer file {vocab.path} has {vocab.vocab_size} ids, more than the "
                         f"checkpoint's vocabulary of {vocab_size}")
    ids: dict[str, int | None] = {"pad_id": vocab_size}
    sources = {"pad_id": f"appended row {vocab_size}: no source id is padding"}
    for name in ("bos_id", "eos_id"):
        ids[name], sources[name] = _source_id(name, given.get(name, AUTO), vocab_size,
                                              model_args, vocab)
        if ids[name] is not None and not 0 <= ids[name] < vocab_size:
            raise ValueError(f"{name}={ids[name]!r} ({sources[name]}) is not an id of the "
                             f"source vocabulary [0, {vocab_size})")
    if vocab is not None:
        problems = special_id_collisions(ids, vocab)
        if problems:
            raise SpecialIdCollision(f"special ids collide with tokenizer file {vocab.path}: "
                                     + "; ".join(problems))
    return ids, sources


def _source_id(name: str, value, vocab_size: int, model_args: dict,
               vocab: VocabularyFile | None) -> tuple[int | None, str]:
    """(id, where it came from) for bos or eos; see `resolve_import_ids` for the order."""
    if value is None or isinstance(value, numbers.Integral):
        return (None if value is None else int(value)), "given by the caller"
    if value != AUTO:
        raise ValueError(f"{name} must be a token id, None or {AUTO!r}, got {value!r}")
    if model_args.get(name) is not None:
        return int(model_args[name]), f"model_args['{name}']"
    if vocab is not None and getattr(vocab, name) is not None:
        i = getattr(vocab, name)
        return i, f"tokenizer file {vocab.path.name}: {vocab.id_to_token(i)!r}"
    if vocab_size in GPT2_VOCABS:
        return GPT2_EOT, (f"GPT-2's <|endoftext|> (the reference trains on GPT-2 ids; "
                          f"vocab_size {vocab_size})")
    return None, "none: neither the caller nor the source names one"
