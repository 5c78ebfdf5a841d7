"""Benchmark: activation capture vs a plain Hugging Face forward pass on the default model.

Same model, same batches, same run. Three ways to get one hook's activations:

- ``hf_forward``: ``model(ids)`` — a plain forward pass with logits (the baseline);
- ``hf_hidden_states``: ``model(ids, output_hidden_states=True)`` — what a user of plain
  ``transformers`` does to read the residual stream;
- ``capture_full``: ``HookedModel.run_with_cache(ids, [hook])`` with logits — the capture overhead;
- ``capture_stop``: the same with ``need_logits=False``, which stops after the hooked layer;
- ``store_full`` / ``store_stop``: the whole ``write_activations`` path (capture, then
  sharded safetensors with row metadata, sha256 and manifest written to disk), with and
  without logits — what ``lmscope activations`` costs end to end.

Each method runs ``--repeats`` times, interleaved so that machine noise hits all of them
alike; the median is reported. The capture overhead is ``capture_full / hf_forward - 1`` (in memory) and
``store_full / hf_forward - 1`` (written to disk).

Run: ``.venv/bin/python bench/activations.py [--batch 8 --ctx 256 --batches 4 --hook blocks.6.hook_resid_post]``
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmscope.activations.contexts import Context
from lmscope.activations.store import write_activations
from lmscope.data.default_corpus import ensure_default_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.models.hooks import HookedModel


def batches_from_corpus(corpus: TokenizedCorpus, batch: int, ctx: int, n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` tensors ``[batch, ctx]`` of held-out text, each row one window of one document."""
    rows: list[np.ndarray] = []
    for _, _, _, tokens in corpus.iter_documents(split="heldout"):
        for start in range(0, len(tokens) - ctx + 1, ctx):
            rows.append(np.asarray(tokens[start : start + ctx], dtype=np.int64))
            if len(rows) == batch * n_batches:
                stacked = torch.from_numpy(np.stack(rows))
                return list(stacked.view(n_batches, batch, ctx))
    raise SystemExit(f"the held-out corpus has fewer than {batch * n_batches} windows of {ctx} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    hooked = HookedModel.from_spec(args.model, device=args.device)
    model = hooked.model
    corpus = TokenizedCorpus.open(ensure_default_corpus("default"))
    batches = [b.to(hooked.device) for b in batches_from_corpus(corpus, args.batch, args.ctx, args.batches)]
    tokens = sum(b.numel() for b in batches)

    def sync() -> None:
        if hooked.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def hf_forward() -> None:
        for ids in batches:
            model(ids, use_cache=False)

    @torch.no_grad()
    def hf_hidden_states() -> None:
        for ids in batches:
            model(ids, use_cache=False, output_hidden_states=True)

    def capture_full() -> None:
        for ids in batches:
            hooked.run_with_cache(ids, [args.hook])

    def capture_stop() -> None:
        for ids in batches:
            hooked.run_with_cache(ids, [args.hook], need_logits=False)

    contexts = [
        Context(tokens=row.cpu().numpy(), doc_index=np.zeros(args.ctx, np.int64), position=np.arange(args.ctx, dtype=np.int32), n_valid=args.ctx)
        for b in batches for row in b
    ]
    scratch = Path(tempfile.mkdtemp(prefix="lmscope-bench-"))

    def store(need_logits: bool) -> None:
        def capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
            return hooked.run_with_cache(ids.to(hooked.device), [args.hook], need_logits=need_logits)[1]

        write_activations(capture, contexts, [args.hook], scratch / "store", batch_size=args.batch, overwrite=True,
                          meta={"bench": need_logits})
        shutil.rmtree(scratch / "store")

    methods = {
        "hf_forward": hf_forward,
        "hf_hidden_states": hf_hidden_states,
        "capture_full": capture_full,
        "capture_stop": capture_stop,
        "store_full": lambda: store(True),
        "store_stop": lambda: store(False),
    }
    hf_forward()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "model": args.model,
        "hook": args.hook,
        "device": str(hooked.device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "tokens_per_run": tokens,
        "tokens_per_s": {name: tokens / t for name, t in median.items()},
        "capture_overhead_vs_hf_forward": median["capture_full"] / median["hf_forward"] - 1,
        "store_overhead_vs_hf_forward": median["store_full"] / median["hf_forward"] - 1,
        "stop_early_speedup_vs_hf_hidden_states": median["hf_hidden_states"] / median["capture_stop"],
        "seconds": seconds,
    }
    shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, rate in result["tokens_per_s"].items():
        print(f"{name:>18}: {rate:8.1f} tokens/s")
    print(f"capture overhead vs plain forward: {100 * result['capture_overhead_vs_hf_forward']:+.1f}% in memory, "
          f"{100 * result['store_overhead_vs_hf_forward']:+.1f}% written to disk")
    print(f"stop-early capture vs output_hidden_states: {result['stop_early_speedup_vs_hf_hidden_states']:.2f}x faster")


if __name__ == "__main__":
    main()
