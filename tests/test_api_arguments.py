"""The public Python API names a bad argument: `inference`, `generate` and the JAX
model raise TypeError/ValueError whose message names the argument, before anything is compiled;
an out-of-range token id is refused instead of being clamped by JAX's gather."""

import re

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

import tnt_jax.generate as jg
import tnt_torch.generate as tg
from tnt.tokenizer import ByteTokenizer
from tnt_jax.model import TnT as JaxTnT
from tnt_jax.model import to_canonical
from tnt_torch.model import TnT as TorchTnT
from tnt_torch.model import load_canonical

FRAMEWORKS = {"jax": jg, "torch": tg}


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config("decoder_only", "ngpt", vocab_size=259)
    jm = JaxTnT(cfg, nnx.Rngs(0))
    return {"jax": jm, "torch": load_canonical(TorchTnT(cfg), to_canonical(jm)).eval()}


BAD_INFERENCE = [  # (model, tokenizer, input_text, keyword arguments) -> (error, message)
    (dict(model=None), TypeError, "model must be a TnT model"),
    (dict(tokenizer=None), TypeError, "tokenizer must be a TnT tokenizer"),
    (dict(input_text=None), TypeError, "input_text must be a string or a list of strings"),
    (dict(input_text=7), TypeError, "input_text must be a string or a list of strings, got int"),
    (dict(input_text=[1, 2]), TypeError, "input_text must be a string or a list of strings"),
    (dict(input_text=[]), ValueError, "input_text is an empty list"),
    (dict(max_length=0), ValueError, "max_length must be an integer >= 1, got 0"),
    (dict(max_length="5"), ValueError, "max_length must be an integer >= 1, got '5'"),
    (dict(max_length=True), ValueError, "max_length must be an integer >= 1, got True"),
    (dict(seed=-1), ValueError, "seed must be an integer in [0, 2**63 - 1], got -1"),
    (dict(seed=2**63), ValueError, "seed must be an integer in [0, 2**63 - 1], got 9223372036854775808"),
    (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
    (dict(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("bad, error, message", BAD_INFERENCE)
def test_inference_names_a_bad_argument(framework, bad, error, message, models):
    call = {**dict(model=models[framework], tokenizer=ByteTokenizer(), input_text="def f(",
                   max_length=2), **bad}
    with pytest.raises(error, match=re.escape(message)):
        FRAMEWORKS[framework].inference(**call)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_generate_refuses_prompts_that_are_not_token_ids(framework, models):
    generate = FRAMEWORKS[framework].generate
    model = models[framework]
    for prompt in (None, [1.5, 2.0], np.array([3.0, 4.0], np.float32)):
        with pytest.raises(TypeError, match="prompt 0 must be a sequence of integer token ids"):
            generate(model, [prompt], 2)
    with pytest.raises(ValueError, match="prompt 1 contain token id 259 at index \\(1,\\)"):
        generate(model, [[5, 6], [7, 259]], 2)
    assert len(generate(model, [[]], 2).tokens) == 1  # an empty prompt is allowed (starts at bos)


def test_the_jax_model_refuses_float_and_out_of_range_ids_outside_jit(models):
    model = models["jax"]
    with pytest.raises(TypeError, match="dec_tokens must be an integer array of token ids, got float32"):
        model(None, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="dec_tokens contain token id -1"):
        model(None, np.array([[4, -1]], np.int32))
