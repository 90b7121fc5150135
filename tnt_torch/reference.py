"""Import a model trained with the public nGPT reference code as a TnT checkpoint.

    params, cfg, path = import_reference("ckpt.pt", n_heads=16, out="runs/imported")
    model, cfg, _ = tnt_jax.load_checkpoint("runs/imported")   # or tnt_torch.load_checkpoint

The conversion itself (names, transposes, scaler storage, `rope_mode`) is framework-free and
lives in `tnt.reference`; this module only turns torch tensors (often bfloat16) into float32
numpy and writes the checkpoint. The reference's GPT-2 tokenizer is not part of TnT, so the
checkpoint's tokenizer spec is `{"kind": "none"}`: feed token ids yourself.

Every source id stays a real token: the pad is an appended id (`vocab_size` of the source), and
bos/eos come from the caller, `model_args`, a tokenizer file or the GPT-2 vocabulary, or are None
(`tnt.special_ids.resolve_import_ids`); the checkpoint's metadata says where each came from
(`meta["special_ids"]`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from tnt.checkpoint_meta import make_meta
from tnt.config import ModelConfig, RunConfig, TrainConfig
from tnt.reference import convert_reference
from tnt.special_ids import AUTO, VocabularyFile, resolve_import_ids
from tnt_torch import checkpoint


def import_reference(source, n_heads: int | None = None, out: str | Path | None = None,
                     base_scale: float | None = None, rope_mode: str = "ngpt_reference",
                     max_len: int | None = None, bos_id: int | None | str = AUTO,
                     eos_id: int | None | str = AUTO, tokenizer_file: str | Path | None = None
                     ) -> tuple[dict[str, np.ndarray], ModelConfig, Path | None]:
    """(canonical params, config, checkpoint path or None) from a reference state dict or from
    the `.pt` file its train.py saves (`{"model": state_dict, "model_args": {...}}`, read with
    `weights_only=True`; `n_head`, `block_size` and `base_scale` are taken from `model_args`
    unless given). With `out`, a TnT checkpoint (step 0) is written under `out/checkpoints`.

    `bos_id`/`eos_id`: an id, None (no such token: an empty prompt is refused / decoding runs to
    `max_new_tokens`), or "auto" (from `model_args`, then `tokenizer_file`, a Hugging Face
    tokenizer.json, then GPT-2's `<|endoftext|>` for a GPT-2-sized vocabulary, else None). An id
    that is a real token of `tokenizer_file` is refused (`SpecialIdCollision`)."""
    args: dict = {}
    if isinstance(source, (str, Path)):
        obj = torch.load(source, map_location="cpu", weights_only=True)
        state = obj.get("model", obj)
        args = obj.get("model_args", {}) or {}
    else:
        state = source
    n_heads = n_heads or args.get("n_head")
    if not n_heads:
        raise ValueError("n_heads is needed: the reference's weights do not record it")
    arrays = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}
    params, cfg = convert_reference(arrays, n_heads, base_scale or args.get("base_scale"),
                                    rope_mode, max_len or args.get("block_size") or 1024)
    vocab = VocabularyFile(tokenizer_file) if tokenizer_file is not None else None
    ids, sources = resolve_import_ids(cfg.pad_id, {"bos_id": bos_id, "eos_id": eos_id}, args, vocab)
    cfg = dataclasses.replace(cfg, bos_id=ids["bos_id"], eos_id=ids["eos_id"])
    path = None
    if out is not None:
        run = RunConfig(cfg, TrainConfig(seq_len=min(64, cfg.max_len_decoder)))
        meta = make_meta("torch", 0, run, {"kind": "none", "vocab_size": cfg.vocab_size})
        meta["special_ids"] = {n: {"id": ids[n], "from": sources[n]} for n in ids}
        path = checkpoint.save(Path(out) / "checkpoints", 0, params, {}, meta)
    return params, cfg, path
