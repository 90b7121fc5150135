"""Per-token scores of label tokens, the one thing `tnt.harness` asks of the model besides
generation (the same as `tnt_jax.score`)."""

from __future__ import annotations

import numpy as np
import torch

from tnt.data import check_token_ids, has_pad
from tnt_torch.model import TnT, without_pad


@torch.no_grad()
def label_logprobs(model: TnT, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(log p of each label [B, L], 0 at pad labels; whether it is the argmax over the non-pad
    tokens [B, L]) of a batch shaped as the training batches (`tnt.data.BatchSpec.make`)."""
    for name, ids in batch.items():
        check_token_ids(np.asarray(ids), model.cfg.vocab_size, name)
    device = next(model.parameters()).device
    t = {k: torch.as_tensor(np.asarray(v, np.int64), device=device) for k, v in batch.items()}
    logits_BxLxV = model(t.get("enc_tokens"), t["dec_tokens"], check_ids=False,  # checked above
                         padded=has_pad(batch, model.cfg.pad_id))
    if logits_BxLxV.dtype not in (torch.float32, torch.float64):
        logits_BxLxV = logits_BxLxV.float()
    labels_BxL, pad = t["labels"], model.cfg.pad_id
    real_BxLxV = without_pad(logits_BxLxV, pad)  # as loss_fn: pad is no outcome
    logp_BxL = torch.log_softmax(real_BxLxV, dim=-1).gather(-1, labels_BxL[..., None])[..., 0]
    best_BxL = real_BxLxV.argmax(-1)
    valid_BxL = labels_BxL != pad
    logp_BxL = torch.where(valid_BxL, logp_BxL, torch.zeros_like(logp_BxL))
    return logp_BxL.cpu().numpy(), (valid_BxL & (best_BxL == labels_BxL)).cpu().numpy()
