"""Per-token scores of label tokens, the one thing `tnt.harness` asks of the model besides
generation (the same as `tnt_torch.score`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tnt.data import check_token_ids
from tnt_jax.model import TnT, merge_params, split_params, without_pad


@partial(jax.jit, static_argnums=0)
def _label_logprobs(graphdef, params, batch):
    model = merge_params(graphdef, params)
    logits_BxLxV = model(batch.get("enc_tokens"), batch["dec_tokens"])
    labels_BxL = batch["labels"]
    pad = model.cfg.pad_id
    real_BxLxV = without_pad(logits_BxLxV, pad)  # as loss_fn: pad is no outcome
    logp_BxLxV = jax.nn.log_softmax(real_BxLxV, axis=-1)
    logp_BxL = jnp.take_along_axis(logp_BxLxV, labels_BxL[..., None], axis=-1)[..., 0]
    best_BxL = jnp.argmax(real_BxLxV, axis=-1)
    valid_BxL = labels_BxL != pad
    return jnp.where(valid_BxL, logp_BxL, 0.0), valid_BxL & (best_BxL == labels_BxL)


def label_logprobs(model: TnT, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(log p of each label [B, L], 0 at pad labels; whether it is the argmax over the non-pad
    tokens [B, L]) of a batch shaped as the training batches (`tnt.data.BatchSpec.make`)."""
    for name, ids in batch.items():  # validated here: inside jit JAX would clamp a bad id
        check_token_ids(np.asarray(ids), model.cfg.vocab_size, name)
    graphdef, params = split_params(model)
    logp, greedy = _label_logprobs(graphdef, params, {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()})
    return np.asarray(logp), np.asarray(greedy)
