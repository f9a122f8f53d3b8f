"""Input pipeline throughput vs what a bart-base train step consumes, on this machine's CPU.

    python bench/data.py [--out bench/out/data.json] [--seq-len 512] [--batch 8] [--model-batch 2]

Measures, in one run:
  * building the built-in corpus (harvest + TFDS array_record write) and training the tokenizer;
  * pretraining pipeline tokens/s: read from the TFDS source + tokenize + pack + batch (grain, in-process);
  * fine-tuning pipeline tokens/s: read + tokenize + truncate + bucket + batch;
  * bart-base train-step tokens/s: a jitted jax.grad of token cross-entropy (forward + backward) with the
    tokenizer's vocabulary, at the pretraining row length;
and prints the ratio pipeline / step (it must stay far above 1: the pipeline is never the bottleneck).
Token counts are row positions (batch x length), the quantity a step consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pipeline_rate(make_iter, n_batches, count):
    it = make_iter()
    next(it)  # start-up (threads, first reads) is not throughput
    start = time.perf_counter()
    tokens = real = 0
    for _ in range(n_batches):
        batch = next(it)
        t, r = count(batch)
        tokens, real = tokens + t, real + r
    seconds = time.perf_counter() - start
    return {"batches": n_batches, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "non_pad_fraction": real / tokens}


def _step_rate(vocab_size, batch, seq_len, repeats):
    """A bart-base forward+backward on [batch, seq_len] rows (source and target), as tokens/s of rows."""
    from forward import train_step_time  # bench/forward.py, this script's directory

    step = train_step_time("bart-base", batch, seq_len, seq_len, repeats=repeats, vocab_size=vocab_size)
    return {"batch": batch, "seq_len": seq_len, "compile_s": step["compile_s"], "step_s": step["step_s"],
            "tokens_per_s": batch * seq_len / step["step_s"], "params_millions": step["params"] / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                      "data.json"))
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="pipeline batch size")
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    parser.add_argument("--model-batch", type=int, default=2, help="bart-base step batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from bart_jax.data import builtin, datasets, loader
    from bart_jax.data.tokenizer import train_tokenizer

    tfds.disable_progress_bar()

    results = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = builtin.harvest_stdlib_docs()
        harvest_s = time.perf_counter() - start
        start = time.perf_counter()
        docs = datasets.prepare_builtin(os.path.join(tmp, "data"), "documents")
        pairs = datasets.prepare_builtin(os.path.join(tmp, "data"), "pairs")
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        tok = train_tokenizer(corpus.documents["train"], args.vocab_size, os.path.join(tmp, "tok"))
        tokenizer_s = time.perf_counter() - start
        token_counts = {s: int(sum(len(ids) - 2 for ids in tok.encode_batch(corpus.documents[s])))
                        for s in builtin.SPLITS}
        results["corpus"] = {
            "python": sys.version.split()[0], "harvest_s": harvest_s, "tfds_write_s": write_s,
            "tokenizer_train_s": tokenizer_s, "vocab_size": tok.vocab_size,
            "documents": {s: len(corpus.documents[s]) for s in builtin.SPLITS},
            "document_tokens": token_counts,
            "pairs": {s: len(corpus.pairs[s]) for s in builtin.SPLITS},
            "harvest_stats": {k: v for k, v in corpus.stats.items() if k != "stdlib_dir"},
        }

        def count_pretrain(b):
            return b["tokens"].size, int((b["tokens"] != tok.pad_id).sum())

        def count_finetune(b):
            return (b["input_ids"].size + b["labels"].size,
                    int(b["attention_mask"].sum() + (b["labels"] != tok.pad_id).sum()))

        results["pretrain_pipeline"] = _pipeline_rate(
            lambda: loader.pretrain_batches(docs["train"], tok, seq_len=args.seq_len, batch_size=args.batch,
                                            seed=0, process_index=0, process_count=1),
            args.batches, count_pretrain)
        results["finetune_pipeline"] = _pipeline_rate(
            lambda: loader.finetune_batches(pairs["train"], tok, max_source_len=args.seq_len, max_target_len=64,
                                            batch_size=args.batch, seed=0, process_index=0, process_count=1),
            args.batches, count_finetune)
    if not args.skip_model:
        results["bart_base_step"] = _step_rate(tok.vocab_size, args.model_batch, args.seq_len, args.repeats)
        step = results["bart_base_step"]["tokens_per_s"]
        results["pipeline_over_step"] = {k: results[k]["tokens_per_s"] / step
                                         for k in ("pretrain_pipeline", "finetune_pipeline")}

    c = results["corpus"]
    print(f"built-in corpus (Python {c['python']}): documents {c['documents']}, tokens (vocab "
          f"{c['vocab_size']}) {c['document_tokens']}, pairs {c['pairs']}")
    print(f"  harvest {c['harvest_s']:.1f}s, TFDS write {c['tfds_write_s']:.1f}s, "
          f"tokenizer training {c['tokenizer_train_s']:.1f}s")
    print(f"\n{'stage':<44}{'tokens/s':>14}{'x step':>10}")
    rows = [("pretrain pipeline (tokenize+pack+batch)", "pretrain_pipeline"),
            ("finetune pipeline (tokenize+bucket+batch)", "finetune_pipeline"),
            ("bart-base fwd+bwd step", "bart_base_step")]
    for label, key in rows:
        if key in results:
            ratio = results.get("pipeline_over_step", {}).get(key, 1.0 if key == "bart_base_step" else None)
            print(f"{label:<44}{results[key]['tokens_per_s']:>14,.0f}"
                  f"{'' if ratio is None else f'{ratio:>9.1f}x'}")
    if "bart_base_step" in results:
        s = results["bart_base_step"]
        print(f"(step: batch {s['batch']} x {s['seq_len']} tokens, {s['step_s']:.2f}s median of {args.repeats}, "
              f"{s['params_millions']:.0f}M params, compile {s['compile_s']:.0f}s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
