"""`transformers` classes around `tnt_torch.model.TnT`: what an exported folder (experiments.export)
loads with `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` and `trust_remote_code=True`.

This file is copied into the folder as `modeling_tnt.py`; it holds no model code of its own (the
model is tnt_torch's, imported), only the adaptation to transformers' calling conventions:
- padding on either side: each row's attended tokens are moved to the front before TnT sees them
  (TnT counts positions from 0 per sequence and masks pad ids), and the logits moved back;
- the pad id is no outcome: its logit is -inf, as in the loss (`without_pad`), so `generate()`
  never emits it and log-probabilities sum to 1 over real tokens;
- cached decoding with the model's own cache (`TnTCache`, passed through generate's `cache`).
The weights are `model.` + TnT's canonical names, `[in, out]` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput, Seq2SeqLMOutput

from tnt.config import ModelConfig, model_config_from_dict
from tnt_torch.model import DecodeCache, TnT, without_pad


class TnTConfig(PretrainedConfig):
    """The TnT `ModelConfig` (`tnt_model`) and the names transformers and its users read."""

    model_type = "tnt"
    tnt_model: dict | None = None
    vocab_size: int = 259
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    max_position_embeddings: int = 256

    @property
    def model_config(self) -> ModelConfig:
        return model_config_from_dict(dict(self.tnt_model or {}))


def pack(tokens_BxL: torch.Tensor, mask_BxL: torch.Tensor | None, pad_id: int):
    """(tokens with each row's attended tokens first, in order, and pad_id after; the order
    used, or None when nothing moves), so that TnT sees positions from 0 whichever side the
    padding was on."""
    if mask_BxL is None or bool(mask_BxL.all()):
        return tokens_BxL, None
    order_BxL = torch.argsort((mask_BxL == 0).to(torch.int8), dim=1, stable=True)
    keep_BxL = mask_BxL.gather(1, order_BxL).bool()
    return tokens_BxL.gather(1, order_BxL).masked_fill(~keep_BxL, pad_id), order_BxL


def unpack(x_BxLxV: torch.Tensor, order_BxL: torch.Tensor | None) -> torch.Tensor:
    """`pack`'s inverse on per-position outputs: each back where its token came from."""
    if order_BxL is None:
        return x_BxLxV
    return torch.empty_like(x_BxLxV).scatter_(1, order_BxL[..., None].expand_as(x_BxLxV), x_BxLxV)


class TnTCache:
    """TnT's decoding cache, what generate() hands back each step: the key/value caches, each row's
    next position, and how many of transformers' input columns were consumed."""

    def __init__(self, state: DecodeCache, next_B: torch.Tensor, seen: int) -> None:
        self.state, self.next_B, self.seen = state, next_B, seen


@dataclass
class TnTEncoderOutput(ModelOutput):
    """The encoder output and the packed encoder tokens (pad where masked: the cross mask)."""

    last_hidden_state: torch.Tensor | None = None
    enc_tokens: torch.Tensor | None = None


class TnTPreTrainedModel(PreTrainedModel):
    config_class = TnTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: TnTConfig) -> None:
        super().__init__(config)
        self.model = TnT(config.model_config)
        self.post_init()

    def _init_weights(self, module) -> None:
        """Weights come from the export; TnT initializes its own otherwise."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # TnT keeps its own cache (TnTCache)

    def _decode(self, tokens_BxL, mask_BxL, cache: TnTCache | None, use_cache: bool | None,
                enc: TnTEncoderOutput | None = None):
        """(logits with pad at -inf, cache) of decoder tokens, with or without the cache."""
        tnt, pad = self.model, self.model.cfg.pad_id
        enc_out = None if enc is None else enc.last_hidden_state
        enc_tokens = None if enc is None else enc.enc_tokens
        if cache is None:
            packed, order = pack(tokens_BxL, mask_BxL, pad)
            B, P = packed.shape
            if not use_cache:
                logits = (tnt.decode(packed, enc_out, enc_tokens) if enc is not None
                          else tnt.decode(packed))
                return without_pad(unpack(logits, order), pad), None
            state = tnt.start_cache(B, tnt.cfg.max_len_decoder, enc_tokens, enc_out)
            positions = torch.arange(P, device=packed.device).expand(B, P)
            logits, state = tnt.extend(packed, positions, state)
            lengths = (torch.full((B,), P, device=packed.device) if mask_BxL is None
                       else mask_BxL.sum(1).to(torch.long))
            return without_pad(unpack(logits, order), pad), TnTCache(state, lengths, P)
        new_BxT = tokens_BxL[:, cache.seen:]
        positions = cache.next_B[:, None] + torch.arange(new_BxT.shape[1], device=new_BxT.device)
        logits, _ = tnt.extend(new_BxT, positions, cache.state)
        cache.next_B, cache.seen = cache.next_B + new_BxT.shape[1], tokens_BxL.shape[1]
        return without_pad(logits, pad), cache

    def _loss(self, logits_BxLxV, labels_BxL) -> torch.Tensor | None:
        """transformers' convention: labels are the inputs (shifted here), -100 and pad ignored."""
        if labels_BxL is None:
            return None
        labels = labels_BxL[:, 1:].masked_fill(labels_BxL[:, 1:] == self.model.cfg.pad_id, -100)
        return F.cross_entropy(logits_BxLxV[:, :-1].reshape(-1, logits_BxLxV.shape[-1]).float(),
                               labels.reshape(-1), ignore_index=-100)


class TnTForCausalLM(TnTPreTrainedModel, GenerationMixin):
    """A decoder-only TnT model."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: TnTCache | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        logits, cache = self._decode(input_ids, attention_mask, cache, use_cache)
        return CausalLMOutputWithPast(loss=self._loss(logits, labels), logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None,
                                      attention_mask=None, use_cache=None, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache}


class _Encoder:
    """What generate() runs once per request (`get_encoder()`): TnT's encoder on packed tokens.
    Not a module, so the weights stay registered once, under `model.`."""

    def __init__(self, owner: TnTForSeq2SeqLM) -> None:
        self.owner = owner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> TnTEncoderOutput:
        packed, _ = pack(input_ids, attention_mask, self.owner.model.cfg.pad_id)
        return TnTEncoderOutput(self.owner.model.encode(packed), packed)

    __call__ = forward


class TnTForSeq2SeqLM(TnTPreTrainedModel, GenerationMixin):
    """An encoder-decoder TnT model; decoding starts from bos (`decoder_start_token_id`)."""

    def get_encoder(self, *args, **kwargs) -> _Encoder:
        return _Encoder(self)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_outputs: TnTEncoderOutput | None = None, cache: TnTCache | None = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            encoder_outputs = self.get_encoder()(input_ids, attention_mask)
        targets = None
        if decoder_input_ids is None and labels is not None:  # transformers' seq2seq convention
            decoder_input_ids, decoder_attention_mask, targets = self._after_bos(labels)
        if decoder_input_ids is None:
            raise ValueError("TnTForSeq2SeqLM needs decoder_input_ids or labels (decoding starts from bos)")
        logits, cache = self._decode(decoder_input_ids, decoder_attention_mask, cache, use_cache,
                                     encoder_outputs)
        loss = self._loss(logits, labels) if targets is None else F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=cache,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def _after_bos(self, labels_BxL: torch.Tensor):
        """Labels given as targets (lm-eval's seq2seq scoring, training loops): the decoder reads
        `[bos] + labels[:-1]` and predicts `labels`; -100 and pad are padding."""
        pad, bos = self.model.cfg.pad_id, self.model.cfg.bos_id
        real = labels_BxL.masked_fill(labels_BxL == -100, pad)
        start = torch.full_like(real[:, :1], bos)
        dec = torch.cat([start, real[:, :-1]], dim=1)
        mask = torch.cat([torch.ones_like(start), (real[:, :-1] != pad).long()], dim=1)
        return dec, mask, real.masked_fill(real == pad, -100)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None,
                                      attention_mask=None, use_cache=None, encoder_outputs=None,
                                      **kwargs) -> dict:
        return {"decoder_input_ids": input_ids, "encoder_outputs": encoder_outputs,
                "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
