"""Small random training batches shared by the sharding tests and the multi-host worker script, and the
config overrides that shrink the tiny config's model for tests whose assertions do not depend on its size."""

import numpy as np

from bart_jax.model import shift_tokens_right

# A 1+1-layer, d_model 32 model on a 512-piece vocabulary: quick to compile where a test checks signals, locks,
# messages or the training loop's control flow rather than what the model learns.
SMALL_MODEL_OVERRIDES = ("model.vocab_size=512", "model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1",
                         "model.encoder_ffn_dim=64", "model.decoder_ffn_dim=64")


def padded_batches(vocab_size: int, steps: int, batch: int, length: int, seed: int) -> list[dict]:
    """`steps` batches of int32 [batch, length] rows with random lengths (pad 1 after), decoder inputs
    shifted right with start token 2, labels = input ids; batch i is drawn from RandomState(seed + i)."""
    out = []
    for i in range(steps):
        r = np.random.RandomState(seed + i)
        ids = r.randint(5, vocab_size, size=(batch, length)).astype(np.int32)
        lens = r.randint(3, length + 1, size=batch)
        mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
        ids = np.where(mask == 1, ids, 1)
        dec = np.asarray(shift_tokens_right(ids, 1, 2))
        out.append(dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                        decoder_attention_mask=(dec != 1).astype(np.int32), labels=ids))
    return out
