"""Text data: tokenizers, the built-in stdlib-docs corpus, TFDS (array_record) datasets and grain loaders.

    tok = train_tokenizer(builtin_documents()['train'], 8000, 'work/tokenizer')   # or load_tokenizer(dir)
    docs = prepare_builtin('work/data', 'documents')      # or prepare_text_corpus({'train': [...]}, ...)
    it = pretrain_batches(docs['train'], tok, seq_len=512, batch_size=8, seed=0)
    pairs = prepare_builtin('work/data', 'pairs')         # or prepare_pairs({'train': [...], ...}, ...)
    it = finetune_batches(pairs['train'], tok, max_source_len=512, max_target_len=64, batch_size=8)
    batch = to_global_batch(next(it), sharding)

Names resolve lazily so importing the package does not import tensorflow-datasets or grain.
"""

from __future__ import annotations

from bart_jax.lazy import lazy_getattr

_LAZY = {
    "SentencePieceTokenizer": "bart_jax.data.tokenizer",
    "Gpt2BpeTokenizer": "bart_jax.data.tokenizer",
    "load_tokenizer": "bart_jax.data.tokenizer",
    "train_tokenizer": "bart_jax.data.tokenizer",
    "builtin_documents": "bart_jax.data.builtin",
    "builtin_pairs": "bart_jax.data.builtin",
    "harvest_stdlib_docs": "bart_jax.data.builtin",
    "PreparedDataset": "bart_jax.data.datasets",
    "prepare_text_corpus": "bart_jax.data.datasets",
    "prepare_pairs": "bart_jax.data.datasets",
    "prepare_builtin": "bart_jax.data.datasets",
    "load_prepared": "bart_jax.data.datasets",
    "iter_text_documents": "bart_jax.data.readers",
    "iter_pairs": "bart_jax.data.readers",
    "pretrain_batches": "bart_jax.data.loader",
    "finetune_batches": "bart_jax.data.loader",
    "to_global_batch": "bart_jax.data.multihost",
    "pack_document": "bart_jax.data.loader",
    "bucket_boundaries": "bart_jax.data.text",
    "split_sentences": "bart_jax.data.text",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
