"""Generation for BART: jitted greedy / sampling / beam search with Hugging Face PyTorch semantics.

    from bart_jax.decode import generate, summarize
    out = generate(config, params, input_ids, attention_mask, num_beams=4, max_length=142, ...)
    out.sequences  # int32 [batch, num_return_sequences, max_length], decoder start token first, pad after EOS
    out.scores     # float32 [batch, num_return_sequences]

`search` holds the model-independent searches, `generate` the model wiring, bucketing and presets
(bart_jax/configs/generation/*.yaml), `rouge` the ROUGE metrics, `cli` the `bart-jax generate|evaluate` commands.
"""

from bart_jax.decode.generate import (
    GenerateOutput,
    generate,
    load_generation_preset,
    pad_batch,
    resolve_controls,
    summarize,
)
from bart_jax.decode.rouge import rouge_scores
from bart_jax.decode.search import SearchControls, beam_search, greedy_search, search

__all__ = ["GenerateOutput", "SearchControls", "beam_search", "generate", "greedy_search",
           "load_generation_preset", "pad_batch", "resolve_controls", "rouge_scores", "search", "summarize"]
