"""`consortium generate`: text from the model, single-node (the baseline) or split into stages.

All stages run in this process; the distributed run is `consortium testcase`. With --compare the
baseline and the split run side by side and the comparison is printed: the tokens must be identical.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF path or a known name (default: smollm2-135m, shipped on PyPI)")
    p.add_argument("--sha256", help="refuse the model file unless its sha256 is this")
    p.add_argument("--prompt", required=True, help="the user's message (wrapped in the model's chat template)")
    p.add_argument("--raw-prompt", action="store_true", help="tokenize the prompt as it is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--split", help="layer ranges per stage, inclusive, e.g. 0-9,10-19,20-29 (default: unsplit)")
    p.add_argument("--compare", action="store_true", help="also run the unsplit baseline and compare tokens and speed")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads per stage (default: all cores)")
    p.add_argument("--ctx", type=int, default=2048, help="context length (positions) per stage")
    p.add_argument("--no-repack", action="store_true", help="turn off llama.cpp's CPU weight repacking (other kernels)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past end-of-generation")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to this file ('-' for stdout)")


def run(args: argparse.Namespace) -> int:
    from consortium.generation import generate, terminal_progress
    from consortium.layers import LayerSplitError, format_split, parse_split
    from consortium.models import resolve_model
    from consortium.sampling import SamplingParams
    from consortium.tokenizer import Tokenizer
    from node_agent.engine import llama as ll
    from node_agent.engine.pipeline import LocalPipeline
    from node_agent.engine.slicing import ModelChecksumError, UnsupportedModelError
    from node_agent.engine.stage import StageConfig

    try:
        model = resolve_model(args.model)
        split = parse_split(args.split) if args.split else None
        sampling = SamplingParams(args.temperature, args.top_p, args.seed)
    except (FileNotFoundError, LayerSplitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = StageConfig(threads=args.threads, n_ctx=args.ctx, repack=not args.no_repack)
    tok = Tokenizer(model)
    try:
        prompt_ids = tok.prompt_tokens(args.prompt, raw=args.raw_prompt)
    except ValueError as e:   # no tokenizer, no chat template for messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_end = None if args.ignore_eos else tok.is_end_of_generation

    def one_run(run_split, label):
        with LocalPipeline(model, run_split, config, model_sha256=args.sha256) as pipe:
            res = generate(pipe, prompt_ids, args.max_tokens, sampling=sampling, is_end=is_end,
                           detokenize=tok.decode, progress=terminal_progress(label))
            out = res.to_dict()
            out["split"] = format_split(pipe.split)
            out["stages"] = len(pipe.split)
            return out

    try:
        runs = {}
        if split is None or args.compare:
            runs["baseline"] = one_run(None, "baseline (unsplit)")
        if split is not None:
            runs["split"] = one_run(split, f"split {format_split(split)}")
    except (LayerSplitError, UnsupportedModelError, ModelChecksumError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from node_agent.engine.slicing import read_model_info

    info = read_model_info(model)
    build = ll.build_info()
    meta = {"model": {"path": str(model), "architecture": info.architecture, "layers": info.n_layers,
                      "file_type": info.file_type},
            "llama_cpp": {"version": build["llama_cpp_python"], "ggml_version": build["ggml_version"],
                          "commit": build["commit"]},
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}}
    if len(runs) == 1:
        result = {**next(iter(runs.values())), **meta}
    else:
        b, s = runs["baseline"], runs["split"]
        diverge = next((i for i, (x, y) in enumerate(zip(b["tokens"], s["tokens"])) if x != y), None)
        if diverge is None and len(b["tokens"]) != len(s["tokens"]):
            diverge = min(len(b["tokens"]), len(s["tokens"]))
        result = {**runs["split"], **meta, "baseline": b, "identical": diverge is None, "first_divergence": diverge,
                  "speed_ratio": round(s["tokens_per_s"] / b["tokens_per_s"], 4) if b["tokens_per_s"] else None}

    print(result["text"])
    if "baseline" in result:
        b = result["baseline"]
        verdict = "identical" if result["identical"] else f"DIFFERENT from token {result['first_divergence']}"
        print(f"\nbaseline: {len(b['tokens'])} tokens, {b['tokens_per_s']:.1f} tok/s | split {result['split']}: "
              f"{len(result['tokens'])} tokens, {result['tokens_per_s']:.1f} tok/s (x{result['speed_ratio']}) | "
              f"tokens {verdict}", file=sys.stderr)
    else:
        print(f"\n{len(result['tokens'])} tokens, {result['tokens_per_s']:.1f} tok/s, split {result['split']}", file=sys.stderr)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if result.get("identical", True) else 1
