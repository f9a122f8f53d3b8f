"""Generation for BART: jitted greedy / sampling / beam search with Hugging Face PyTorch semantics.

    from bart_jax.decode import generate, summarize
    out = generate(config, params, input_ids, attention_mask, num_beams=4, max_length=142, ...)
    out.sequences  # int32 [batch, num_return_sequences, max_length], decoder start token first, pad after EOS
    out.scores     # float32 [batch, num_return_sequences]

`controls` holds the decoding controls and HF's logits processors, `search` the model-independent searches,
`generate` the model wiring, batching of texts and presets (configs/generation/*.yaml), `rouge` the
ROUGE metrics, `files` the model, documents, pairs and predictions files that generation and evaluation read
and write. The `bart-jax generate|evaluate` commands
are in bart_jax.cli.decode.
"""

from bart_jax.decode.generate import (
    GenerateOutput,
    generate,
    generate_texts,
    load_generation_preset,
    pad_batch,
    resolve_controls,
    summarize,
)
from bart_jax.decode.rouge import rouge_scores
from bart_jax.decode.search import SearchControls, beam_search, greedy_search, search

__all__ = ["GenerateOutput", "SearchControls", "beam_search", "generate", "generate_texts", "greedy_search",
           "load_generation_preset", "pad_batch", "resolve_controls", "rouge_scores", "search", "summarize"]
