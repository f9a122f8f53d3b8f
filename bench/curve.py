"""Pretraining learning curve: how well the main job's denoiser reconstructs text after N steps (VALIDATION split).

    python bench/curve.py [--budgets 1500,3000] [--every 500] [--eval-batches 8] [--finetune]
                          [--workdir bench/out/curve] [--out bench/out/curve.json] [key=value ...]

For each budget (total pretraining steps; the learning-rate schedule decays over that budget) one pretraining run
of the default config (`configs/tiny.yaml`, plus any `key=value` overrides) keeps a checkpoint every
`--every` steps; each checkpoint is then measured as the main job's stage 2 measures the pretrained model:
teacher-forced token accuracy of reconstructing the validation rows from clean input and from the default noise,
next to the copy baseline. Minutes are wall-clock training time to that step (set-up and checkpoint pauses
included, measurements excluded): run it on a quiet machine (`uptime`). Only a budget's last row has its
schedule fully decayed; earlier rows show where a run of that budget passes. With `--finetune`, each budget's
final model is then fine-tuned as the main job does and scored on the validation pairs (ROUGE-L next to the lead's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="3000", help="comma-separated total pretraining steps, one run each")
    p.add_argument("--every", type=int, default=500, help="checkpoint (and measure) every this many steps")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per measurement (main job: 8)")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune each budget's final model (main job defaults) and score validation ROUGE")
    p.add_argument("--workdir", default="bench/out/curve")
    p.add_argument("--out", default="bench/out/curve.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the default config")
    return p.parse_args(argv)


def _step_clock():
    """A StageReporter that notes, for each reported step, its loss and when it settled (seconds since creation)."""
    from bart_jax.train.progress import StageReporter

    class StepClock(StageReporter):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.seconds: dict[int, float] = {}
            self.losses: dict[int, float] = {}

        def step(self, stage, step_no, metrics, speed):
            self.seconds[step_no] = time.perf_counter() - self.t0
            self.losses[step_no] = metrics["loss"]

    return StepClock()


def run_budget(steps: int, every: int, eval_batches: int, workdir: str, overrides: list[str],
               finetune: bool = False) -> list[dict]:
    """Pretrain `steps` steps in `workdir` and measure every kept checkpoint as a denoiser (and, with
    `finetune`, the fine-tuned final model's validation ROUGE, on the last row)."""
    import jax

    from bart_jax.convert import from_pretrained
    from bart_jax.data import load_tokenizer
    from bart_jax.pipeline import DEFAULT_CONFIG, measure_pretrained
    from bart_jax.train.checkpoint import restore_params
    from bart_jax.train.config import load_config
    from bart_jax.train.inputs import load_or_train_tokenizer
    from bart_jax.train.loop import pretrain

    cfg = load_config(DEFAULT_CONFIG, [f"workdir={workdir}", f"pretrain.train.steps={steps}",
                                       f"pretrain.train.eval_every={steps}", f"pretrain.train.checkpoint_every={every}",
                                       f"checkpoint.keep={steps // every + 1}", "checkpoint.keep_best=0",
                                       "pretrain.train.progress_bar=false", "finetune.train.progress_bar=false",
                                       *overrides])
    load_or_train_tokenizer(cfg)
    clock = _step_clock()
    result = pretrain(cfg, reporter=clock)
    model_config, final_params = from_pretrained(result.model_dir)
    tokenizer = load_tokenizer(result.model_dir)
    shardings = jax.tree.map(lambda x: x.sharding, final_params)
    rows = []
    for step in sorted(int(n) for n in os.listdir(result.checkpoint_dir) if n.isdigit()):
        params = restore_params(os.path.join(result.checkpoint_dir, str(step)), final_params, shardings)
        report = measure_pretrained(cfg, model_config, params, tokenizer, eval_batches)
        rows.append({"budget": steps, "step": step, "train_min": clock.seconds.get(step, float("nan")) / 60,
                     "loss": clock.losses.get(step, float("nan")), "clean": report.clean_accuracy,
                     "noised": report.noised_accuracy, "copy": report.copy_accuracy, "tokens": report.tokens})
        print(json.dumps(rows[-1]), flush=True)
    if finetune:
        from sweep import finetune_and_score

        scored = finetune_and_score(cfg)
        rows[-1].update(rougeL=scored["rouge"]["rougeL"], lead_rougeL=scored["lead"]["rougeL"],
                        finetune_min=scored["seconds"]["finetune"] / 60, examples=scored["examples"])
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| budget (steps) | step | train min | loss | clean % | noised % | copy % | fine-tuned R-L (lead) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rouge = f"{r['rougeL']:.2f} ({r['lead_rougeL']:.2f})" if "rougeL" in r else ""
        lines.append(f"| {r['budget']} | {r['step']} | {r['train_min']:.1f} | {r['loss']:.3f} | "
                     f"{100 * r['clean']:.1f} | {100 * r['noised']:.1f} | {100 * r['copy']:.1f} | {rouge} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for steps in (int(b) for b in args.budgets.split(",")):
        rows += run_budget(steps, args.every, args.eval_batches, os.path.join(args.workdir, f"steps_{steps}"),
                           args.overrides, args.finetune)
    print(markdown(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"overrides": args.overrides, "every": args.every, "eval_batches": args.eval_batches,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
