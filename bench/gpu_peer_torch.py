"""The PyTorch peer of bench/gpu_check.py: Hugging Face BART on the same device, in its own process.

    PYTHON_WITH_TORCH bench/gpu_peer_torch.py SPEC.json

It imports only torch, transformers and numpy (this project never imports torch). SPEC (written by
gpu_check.py) holds the device and two lists of cases; each result is printed as one line
`GPU_CHECK_ROW {json}`:
- "train": [{model, hf_config, batch, source, target, warmup, steps, repeats, lr}]: one training step of
  BartForConditionalGeneration with SDPA attention, bf16 autocast over fp32 weights, the loss Hugging Face
  computes from `labels`, and fused AdamW (PyTorch has no LAMB; the optimizer update is a small share of the
  step). Random token ids, all real (no padding). A batch that runs out of memory is halved.
- "generate": {model_dir, inputs, controls, repeats}: `generate` of the checkpoint bart_jax wrote (the same
  weights as its own run), cast to bf16, on the same input ids and mask, with the same controls.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

ROW = "GPU_CHECK_ROW "


def emit(row: dict) -> None:
    print(ROW + json.dumps(row), flush=True)


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_case(torch, transformers, device: str, case: dict) -> dict:
    """Step times of `case`'s training step at the largest of batch, batch/2, ... that fits."""
    config = transformers.BartConfig(**case["hf_config"])
    batch = case["batch"]
    tried = []
    while batch >= 1:
        try:
            return {**train_at(torch, transformers, device, config, case, batch), "tried": tried}
        except torch.OutOfMemoryError as e:
            tried.append({"batch": batch, "oom": str(e).splitlines()[0][:200]})
            batch //= 2
            if device == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"no batch fits: {tried}")


def train_at(torch, transformers, device: str, config, case: dict, batch: int) -> dict:
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=case["lr"], weight_decay=0.01, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config.vocab_size, (batch, case["source"]), generator=g).to(device)
    labels = torch.randint(4, config.vocab_size, (batch, case["target"]), generator=g).to(device)
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(case["warmup"]):
            loss = step()
        sync(torch, device)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(case["repeats"]):
            t0 = time.perf_counter()
            for _ in range(case["steps"]):
                loss = step()
            sync(torch, device)
            times.append((time.perf_counter() - t0) / case["steps"])
        step_s = statistics.median(times)
        return {"model": case["model"], "batch": batch, "source_length": case["source"],
                "target_length": case["target"], "attn_implementation": model.config._attn_implementation,
                "warmup_s": warmup_s, "step_s": step_s, "step_s_repeats": times,
                "tokens_per_s": batch * (case["source"] + case["target"]) / step_s, "loss": float(loss),
                "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
    finally:
        del model, opt


def generate_case(torch, transformers, numpy, device: str, case: dict) -> dict:
    model = transformers.BartForConditionalGeneration.from_pretrained(case["model_dir"], attn_implementation="sdpa")
    model.to(device=device, dtype=torch.bfloat16).eval()
    inputs = numpy.load(case["inputs"])
    ids = torch.from_numpy(inputs["input_ids"].astype("int64")).to(device)
    mask = torch.from_numpy(inputs["attention_mask"].astype("int64")).to(device)
    c = case["controls"]
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"], pad_token_id=c["pad_token_id"],
        decoder_start_token_id=c["decoder_start_token_id"])
    kw = dict(input_ids=ids, attention_mask=mask, num_beams=c["num_beams"], max_length=c["max_length"],
              min_length=c["min_length"], no_repeat_ngram_size=c["no_repeat_ngram_size"],
              length_penalty=c["length_penalty"], early_stopping=c["early_stopping"],
              forced_bos_token_id=c["forced_bos_token_id"], forced_eos_token_id=c["forced_eos_token_id"],
              do_sample=False, use_cache=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**kw)
        sync(torch, device)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(case["repeats"]):
            t0 = time.perf_counter()
            out = model.generate(**kw)
            sync(torch, device)
            times.append(time.perf_counter() - t0)
    # Generated tokens per row: after the decoder start, up to and including EOS (pad after it).
    lengths = (out[:, 1:] != c["pad_token_id"]).sum(-1).tolist()
    seconds = statistics.median(times)
    return {"batch": ids.shape[0], "first_call_s": first_s, "seconds": seconds, "seconds_repeats": times,
            "sequences_per_s": ids.shape[0] / seconds, "generated_lengths": lengths,
            "attn_implementation": model.config._attn_implementation}


def main(argv) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    import numpy
    import torch
    import transformers

    device = spec["device"]
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    failed = False
    for case in spec.get("train", []):
        try:
            emit({"kind": "peer_train", **info, **train_case(torch, transformers, device, case)})
        except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others
            failed = True
            emit({"kind": "peer_train", **info, "model": case["model"], "error": f"{type(e).__name__}: {e}"[:500]})
    if spec.get("generate"):
        try:
            emit({"kind": "peer_generate", **info, **generate_case(torch, transformers, numpy, device,
                                                                    spec["generate"])})
        except Exception as e:  # noqa: BLE001
            failed = True
            emit({"kind": "peer_generate", **info, "error": f"{type(e).__name__}: {e}"[:500]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
