"""Import a model trained with the public nGPT reference code as a TnT checkpoint.

    params, cfg, path = import_reference("ckpt.pt", n_heads=16, out="runs/imported")
    model, cfg, _ = tnt_jax.load_checkpoint("runs/imported")   # or tnt_torch.load_checkpoint

The conversion itself (names, transposes, scaler storage, `rope_mode`) is framework-free and
lives in `tnt.reference`; this module only turns torch tensors (often bfloat16) into float32
numpy and writes the checkpoint. The reference's GPT-2 tokenizer is not part of TnT, so the
checkpoint's tokenizer spec is `{"kind": "none"}`: feed token ids yourself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tnt.checkpoint_meta import make_meta
from tnt.config import ModelConfig, RunConfig, TrainConfig
from tnt.reference import convert_reference
from tnt_torch import checkpoint


def import_reference(source, n_heads: int | None = None, out: str | Path | None = None,
                     base_scale: float | None = None, rope_mode: str = "ngpt_reference",
                     max_len: int | None = None
                     ) -> tuple[dict[str, np.ndarray], ModelConfig, Path | None]:
    """(canonical params, config, checkpoint path or None) from a reference state dict or from
    the `.pt` file its train.py saves (`{"model": state_dict, "model_args": {...}}`, read with
    `weights_only=True`; `n_head`, `block_size` and `base_scale` are taken from `model_args`
    unless given). With `out`, a TnT checkpoint (step 0) is written under `out/checkpoints`."""
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
    path = None
    if out is not None:
        run = RunConfig(cfg, TrainConfig(seq_len=min(64, cfg.max_len_decoder)))
        meta = make_meta("torch", 0, run, {"kind": "none", "vocab_size": cfg.vocab_size})
        path = checkpoint.save(Path(out) / "checkpoints", 0, params, {}, meta)
    return params, cfg, path
