"""Small random training batches shared by the sharding tests and the multi-host worker script."""

import numpy as np

from bart_jax.model import shift_tokens_right


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
