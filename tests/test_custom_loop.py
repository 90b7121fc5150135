"""A custom training loop's public pieces: `tnt.data.Batches` in the documented format, and
`save_checkpoint` of either framework, read back by `load_checkpoint` and `experiments.generate`."""

import numpy as np
import pytest
from helpers import tiny_config

from experiments import generate
from tnt.checkpoint_meta import CheckpointError
from tnt.config import RunConfig, TrainConfig
from tnt.data import Batches, BatchSpec
from tnt.tokenizer import ByteTokenizer

CFG = tiny_config("decoder_only", "ngpt", vocab_size=259)


def test_batches_have_the_documented_format():
    stream = np.arange(3, 203, dtype=np.int32)
    for arch, keys in (("decoder_only", {"dec_tokens", "labels"}),
                       ("encoder_decoder", {"enc_tokens", "dec_tokens", "labels"})):
        spec = BatchSpec(arch, batch_size=4, seq_len=8, enc_len=5, bos_id=1)
        batch = Batches(spec, stream, stream, seed=0).train_batch(3)
        assert set(batch) == keys and all(v.dtype == np.int32 for v in batch.values())
        assert batch["labels"].shape == batch["dec_tokens"].shape == (4, 8)
        if arch == "decoder_only":  # the next token
            np.testing.assert_array_equal(batch["labels"][:, :-1], batch["dec_tokens"][:, 1:])
        else:  # bos, then the target shifted right, after enc_len tokens of prefix
            assert batch["enc_tokens"].shape == (4, 5) and (batch["dec_tokens"][:, 0] == 1).all()
            np.testing.assert_array_equal(batch["labels"][:, :-1], batch["dec_tokens"][:, 1:])
            np.testing.assert_array_equal(batch["labels"][:, 0], batch["enc_tokens"][:, -1] + 1)


def make_model(framework):
    if framework == "jax":
        from flax import nnx

        from tnt_jax import TnT
        return TnT(CFG, nnx.Rngs(3))
    from tnt_torch import TnT
    return TnT(CFG, seed=3)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_save_checkpoint_loads_and_generates(framework, tmp_path, capsys):
    module = pytest.importorskip(f"tnt_{framework}")
    model = make_model(framework)
    run = RunConfig(model=CFG, train=TrainConfig(seq_len=16, max_steps=7))
    path = module.save_checkpoint(tmp_path / "run", model, run, ByteTokenizer(), 7)
    assert path == tmp_path / "run" / "checkpoints" / "7"
    loaded, cfg, tok = module.load_checkpoint(tmp_path / "run")
    assert cfg == run and isinstance(tok, ByteTokenizer)
    for name, value in module.to_canonical(model).items():
        np.testing.assert_array_equal(module.to_canonical(loaded)[name], value, err_msg=name)
    code = generate.main(["--ckpt", str(tmp_path / "run"), "--backend", framework, "--prompt", "ab",
                          "--max-new-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.strip()
    module.save_checkpoint(tmp_path / "m", model, CFG, ByteTokenizer(), 0)  # a ModelConfig alone
    assert module.load_checkpoint(tmp_path / "m")[1].model == CFG
    with pytest.raises(CheckpointError, match="d_model: 64 != 32"):
        module.save_checkpoint(tmp_path / "bad", model, tiny_config("decoder_only", d_model=64,
                                                                    vocab_size=259), ByteTokenizer(), 1)
