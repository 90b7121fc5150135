"""A checkpoint as a Hugging Face model folder, and that folder read back (no framework needed).

The folder holds what `transformers` reads: `config.json` (model_type "tnt", `auto_map` to the
copied `modeling_tnt.py`, which is `tnt_torch/hf.py`), `model.safetensors` (`model.` + the
canonical names, float32 `[in, out]`), `generation_config.json` (bos, eos, pad) and the tokenizer
as `tokenizer.json` + `tokenizer_config.json` (a byte-level one built to give TnT's byte ids).
`config.json` also keeps the checkpoint's own metadata under `tnt`, so `tnt.checkpoint_io` reads
an export back as the checkpoint it came from: same parameters, config and tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tnt.checkpoint_meta import CheckpointError
from tnt.config import RunConfig
from tnt.tokenizer import SPECIALS

FORMAT = "tnt-hf-export"
CONFIG, WEIGHTS, MODELING = "config.json", "model.safetensors", "modeling_tnt.py"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
PREFIX = "model."  # the attribute holding TnT in tnt_torch.hf's classes


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `write_export`."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        return False
    try:
        return json.loads((path / CONFIG).read_text()).get("tnt", {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def byte_chars() -> list[str]:
    """The character `tokenizers`' ByteLevel pre-tokenizer gives each byte (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """A `tokenizers` tokenizer.json that encodes as `tnt.tokenizer.ByteTokenizer` does: ids 0, 1,
    2 for pad, bos, eos, byte b as id b + 3 (a byte-level BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {name: i for i, name in enumerate(SPECIALS)}
    vocab.update({c: b + len(SPECIALS) for b, c in enumerate(byte_chars())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok.to_str()


def _token_text(tokenizer_json: str, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    data = json.loads(tokenizer_json)
    by_id = {int(a["id"]): a["content"] for a in data.get("added_tokens") or []}
    vocab = data["model"].get("vocab") or {}
    if isinstance(vocab, dict):
        by_id.update({int(i): t for t, i in vocab.items() if int(i) not in by_id})
    return by_id.get(token_id)


def tokenizer_files(spec: dict, cfg: RunConfig) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for `AutoTokenizer`; none for a checkpoint
    without a tokenizer (an import)."""
    kind = spec.get("kind")
    if kind == "none":
        return {}
    text = byte_tokenizer_json() if kind == "byte" else spec["json"]
    m = cfg.model
    names = {f"{role}_token": _token_text(text, getattr(m, f"{role}_id")) for role in ("pad", "bos", "eos")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.max_len_decoder,
              "clean_up_tokenization_spaces": False, **{k: v for k, v in names.items() if v}}
    return {TOKENIZER: text, TOKENIZER_CONFIG: json.dumps(config, indent=1)}


def hf_config(meta: dict, cfg: RunConfig) -> dict:
    """config.json: transformers' names, the class map and TnT's own config and metadata."""
    m = cfg.model
    kind = "Seq2SeqLM" if m.has_encoder else "CausalLM"
    spec = {k: v for k, v in meta["tokenizer"].items() if k != "json"}  # the json is tokenizer.json
    out = {"architectures": [f"TnTFor{kind}"], "model_type": "tnt",
           "auto_map": {"AutoConfig": "modeling_tnt.TnTConfig",
                        f"AutoModelFor{kind}": f"modeling_tnt.TnTFor{kind}"},
           "tnt_model": cfg.to_dict()["model"], "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "num_attention_heads": m.n_heads, "num_hidden_layers": m.n_decoder_layers,
           "max_position_embeddings": m.max_len_decoder, "is_encoder_decoder": m.has_encoder,
           "pad_token_id": m.pad_id, "bos_token_id": m.bos_id, "eos_token_id": m.eos_id,
           "tie_word_embeddings": False, "dtype": "float32",
           "tnt": {"format": FORMAT, "checkpoint": {**meta, "tokenizer": spec}}}
    if m.has_encoder:
        out["decoder_start_token_id"] = m.bos_id
    return out


def generation_config(cfg: RunConfig) -> dict:
    m = cfg.model
    out = {"bos_token_id": m.bos_id, "eos_token_id": m.eos_id, "pad_token_id": m.pad_id}
    if m.has_encoder:
        out["decoder_start_token_id"] = m.bos_id
    return out


def write_export(out: str | Path, params: dict[str, np.ndarray], meta: dict,
                 modeling_source: str | Path) -> Path:
    """Write the folder `out` (new or empty) atomically: built in a temporary sibling, then
    renamed into place, so a failure leaves nothing half-written and nothing is overwritten."""
    from safetensors.numpy import save_file

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one "
                              f"(nothing was written)")
    cfg = RunConfig.from_dict(meta["config"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
                  str(tmp / WEIGHTS), metadata={"format": "pt"})
        files = {CONFIG: json.dumps(hf_config(meta, cfg), indent=1),
                 "generation_config.json": json.dumps(generation_config(cfg), indent=1),
                 **tokenizer_files(meta["tokenizer"], cfg)}
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        shutil.copyfile(modeling_source, tmp / MODELING)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_export_meta(path: str | Path) -> dict:
    """The metadata of the checkpoint an exported folder came from (its tokenizer.json inside)."""
    path = Path(path)
    try:
        meta = dict(json.loads((path / CONFIG).read_text())["tnt"]["checkpoint"])
        if meta["tokenizer"].get("kind") in ("bpe", "hf"):
            text = (path / TOKENIZER).read_text(encoding="utf-8")
            meta["tokenizer"] = {**meta["tokenizer"], "json": text}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"exported folder {path} is unreadable: {e}") from e
    return meta


def read_export(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(canonical float32 params, the checkpoint's metadata) of an exported folder."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta = read_export_meta(path)
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as e:  # OSError or safetensors' own errors
        raise CheckpointError(f"exported folder {path} has unreadable weights: {e}") from e
    stray = sorted(k for k in weights if not k.startswith(PREFIX))
    if stray:
        raise CheckpointError(f"exported folder {path} has weights outside '{PREFIX}': {stray[:4]}")
    return {k[len(PREFIX):]: v for k, v in weights.items()}, meta
