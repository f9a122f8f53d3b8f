"""The main job on data it was never tuned on: man pages (DESCRIPTION -> the NAME line's one-liner).

    python bench/heldout.py [--workdir bench/out/heldout] [--family-cap 20] [--out bench/out/heldout.json]

Builds document -> summary pairs from the machine's English man pages (/usr/share/man/man[1-8]/*.gz): the
document is the DESCRIPTION section as plain text (roff requests and escapes dropped, at most 300 words), the
summary what follows the dash on the NAME line ("ls - list directory contents"). Pages of one family (the
name up to its first '_', '-', ':' or '.': gcloud_*, git-*, EVP_*) are capped at --family-cap, so one
generated family cannot fill the set with near-duplicates; exact duplicates are dropped. Split by a hash of
the page name: 80% train, 10% validation, 10% test.

Then it runs what a user with their own data runs, each as its own process: `bart-jax data text` on the
training documents (train files only, so the validation split is held out of them), `bart-jax data pairs`,
and `bart-jax run data.pretrain_source=... data.finetune_source=...` with the default config, and prints the
job's test-split table (ours, the random-init control, the lead baseline). Which pages exist depends on the
machine (Debian/Ubuntu images carry a few thousand; minimal containers may carry none), so compare runs on
one machine. Nothing here tunes anything: the defaults come from bench/sweep.py on the built-in corpus.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

# roff escapes -> text, in order; anything left as backslash + character becomes that character.
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),            # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),                        # size changes
    (re.compile(r"\\n(\[[^\]]*\]|\(..|.)|\\\$\d"), ""),      # number registers, macro arguments
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),            # strings
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),                # other special characters (bullets, ...)
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&|^%:/,]|\\c$"), ""),
    (re.compile(r'\\".*'), ""),                              # comments
    (re.compile(r"\\(.)"), lambda m: "\\" if m.group(1) == "e" else m.group(1)),  # \e, \-, \. ...
]
_FONT_MACROS = {".B", ".I", ".BR", ".BI", ".IR", ".RB", ".RI", ".IB", ".SM", ".SB"}
_FAMILY = re.compile(r"[_\-:.]")


def roff_text(lines: list[str]) -> str:
    """The running text of roff source lines: font macros keep their arguments, other requests go."""
    words = []
    for line in lines:
        if line.startswith((".", "'")):
            request, _, rest = line.partition(" ")
            if request in _FONT_MACROS and rest:
                args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]
                # .B/.I join their arguments with spaces; the alternating ones (.BR, .IR, ...) without.
                words.append((" " if len(request) == 2 else "").join(args))
            continue
        words.append(line)
    text = " ".join(words)
    for pattern, replacement in _ESCAPES:
        text = pattern.sub(replacement, text)
    return re.sub(r"\s+", " ", text).strip()


def sections(source: str) -> dict[str, list[str]]:
    """Section title (upper case) -> its source lines."""
    out, current, in_macro = {}, None, False
    for line in source.splitlines():
        if in_macro or line.startswith((".de", ".am")):  # macro definitions, up to their ".." line
            in_macro = line.strip() != ".."
            continue
        m = re.match(r'^\.S[Hh]\s+"?([^"]*)"?\s*$', line)
        if m:
            current = m.group(1).strip().upper()
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line)
    return out


def man_pair(path: str) -> dict | None:
    """{'page', 'document', 'summary'} of one man page, or None (a redirect, or no usable NAME/DESCRIPTION)."""
    try:
        source = gzip.open(path).read().decode("utf-8", "replace")
    except (OSError, EOFError):
        return None
    if source.lstrip().startswith(".so"):
        return None
    parts = sections(source)
    name, description = roff_text(parts.get("NAME", [])), parts.get("DESCRIPTION")
    pieces = re.split(r"\s+-+\s+", name, maxsplit=1)
    if not description or len(pieces) != 2:
        return None
    summary, document = pieces[1].strip(), roff_text(description)
    if len(summary.split()) < 2 or len(document.split()) < 15:
        return None
    return {"page": os.path.basename(path), "document": " ".join(document.split()[:300]), "summary": summary}


def build_pairs(paths: list[str], family_cap: int) -> dict[str, list[dict]]:
    """split -> pairs, families capped and duplicates dropped (see the module docstring)."""
    per_family, seen = {}, set()
    splits = {"train": [], "validation": [], "test": []}
    for path in sorted(paths):
        family = _FAMILY.split(os.path.basename(path))[0].lower()
        if per_family.get(family, 0) >= family_cap:
            continue
        pair = man_pair(path)
        if pair is None or (pair["document"], pair["summary"]) in seen:
            continue
        seen.add((pair["document"], pair["summary"]))
        per_family[family] = per_family.get(family, 0) + 1
        bucket = int(hashlib.sha1(pair["page"].encode()).hexdigest(), 16) % 10
        splits["validation" if bucket == 0 else "test" if bucket == 1 else "train"].append(pair)
    return splits


def _bart_jax(*args: str) -> str:
    """Run `bart-jax ARGS` as a user would; its stdout (stderr passes through)."""
    out = subprocess.run([sys.executable, "-m", "bart_jax", *args], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bart-jax {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}")
    return out.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--man-dir", default="/usr/share/man")
    parser.add_argument("--family-cap", type=int, default=20, help="at most this many pages per family")
    parser.add_argument("--workdir", default=os.path.join("bench", "out", "heldout"))
    parser.add_argument("--out", default=os.path.join("bench", "out", "heldout.json"))
    args, overrides = parser.parse_known_args(argv)  # the rest goes to `bart-jax run` (config overrides)

    splits = build_pairs(glob.glob(os.path.join(args.man_dir, "man[1-8]", "*.gz")), args.family_cap)
    sizes = {k: len(v) for k, v in splits.items()}
    if min(sizes.values()) == 0:
        raise SystemExit(f"too few usable man pages under {args.man_dir}: {sizes}")
    files = os.path.join(args.workdir, "files")
    os.makedirs(files, exist_ok=True)
    for split, pairs in splits.items():
        with open(os.path.join(files, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps({"document": p["document"], "summary": p["summary"]}) + "\n" for p in pairs)
    with open(os.path.join(files, "text.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": p["document"]}) + "\n" for p in splits["train"])
    data_dir = os.path.join(args.workdir, "data")
    text = json.loads(_bart_jax("data", "text", "--data-dir", data_dir, "--name", "man", "--train",
                                os.path.join(files, "text.jsonl")).splitlines()[0])
    pairs = json.loads(_bart_jax("data", "pairs", "--data-dir", data_dir, "--name", "man",
                                 *[a for s in splits for a in (f"--{s}", os.path.join(files, f"{s}.jsonl"))])
                       .splitlines()[0])
    run_dir = os.path.join(args.workdir, "run")
    _bart_jax("run", f"workdir={run_dir}", f"data.pretrain_source={text['path']}",
              f"data.finetune_source={pairs['path']}", *overrides)
    with open(os.path.join(run_dir, "results", "summary.json")) as f:
        summary = json.load(f)

    print(f"man pages under {args.man_dir}, at most {args.family_cap} per family: pairs {sizes}")
    print(f"{'system':<24} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}")
    for system, scores in summary["rouge"].items():
        print(f"{system:<24} {scores['rouge1']:>8.2f} {scores['rouge2']:>8.2f} {scores['rougeL']:>8.2f}")
    d = summary["denoiser"]
    print(f"denoiser: clean {100 * d['clean_accuracy']:.1f}%, noised {100 * d['noised_accuracy']:.1f}% "
          f"(copying the noised input: {100 * d['copy_accuracy']:.1f}%); job {summary['seconds']:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"pairs": sizes, "family_cap": args.family_cap, "overrides": overrides,
                   "rouge": summary["rouge"], "denoiser": d, "seconds": summary["seconds"]}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
