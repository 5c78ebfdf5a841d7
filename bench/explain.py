"""Benchmark: automated explanations on this machine — throughput, and the scores of SAE features against neurons.

Units: ``--units`` SAE features (the study's SAE set-up: the default suite's 1.6m model at its last checkpoint,
``blocks.1.hook_resid_post``, top-k, width 1024, k 16, 65,536 training tokens; trained once and cached under
``$LMSCOPE_HOME/bench/explain``) and as many neurons of ``blocks.1.mlp.hook_post`` on the same tokens, each drawn
with seed 0 among the units that fire on 0.01 %–90 % of tokens. Records as in the default study (window 16, 2 top,
1 quantile, 2 random, 3 quiet).

Explainer and simulator: the default model (SmolLM2-135M-Instruct) through lmscope's local ``transformers``
backend, answers not cached, so every call is timed. Reported per unit kind: explanations per minute, units
scored per minute (simulation, detection and fuzzing, with the explanation and with a shuffled one), and the
distribution of each score (median and quartiles) for own and shuffled explanations.

Reference: the same explanation and detection requests sent to llama-cpp-python's OpenAI-compatible server
serving the same GGUF (what a delphi-style pipeline would call), one request at a time and with ``--concurrency``
in flight, timed in the same run; and how many of its explanations equal the local backend's word for word.

Run: ``.venv/bin/python bench/explain.py [--units 16] [--threads 2] [--json] [--no-server]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback server helper shared with the tests


def _setup(log: Any) -> dict[str, Any]:
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.home import lmscope_home
    from lmscope.models.hooks import HookedModel
    from lmscope.sae.job import run_sae_job
    from lmscope.sae.train import SaeTrainConfig
    from lmscope.suites.catalog import resolve_suite
    from lmscope.suites.train import ensure_default_suite

    suite_dir = ensure_default_suite(device="cpu")
    suite, _ = resolve_suite(str(suite_dir))
    last = max(suite.checkpoints(), key=lambda c: c.step)
    spec = f"{suite_dir}/1.6m@{last.revision}"
    root = lmscope_home() / "bench" / "explain"
    log("SAE (cached after the first run)")
    config = SaeTrainConfig(hook="blocks.1.hook_resid_post", arch="topk", width=1024, k=16, epochs=2, batch_size=1024)
    sae = run_sae_job(spec, config, root / "sae", corpus=suite_dir / "corpus", tokens=65536, ctx=128, replay_suite=suite_dir,
                      device="cpu")
    hooked = HookedModel.from_spec(spec, device="cpu")
    hooked.hook_point("blocks.1.mlp.hook_post")
    capture_corpus_activations(hooked, TokenizedCorpus.open(suite_dir / "corpus"), ["blocks.1.mlp.hook_post"], 65536, 128,
                               root / "neurons", split="train", meta={"model": spec})
    return {"suite": suite_dir, "spec": spec, "sae": sae, "neurons": root / "neurons", "tokenizer": hooked.tokenizer}


class _Clock:
    """A progress callback that records when each task first and last reported."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        now = time.perf_counter()
        self.first.setdefault(task, now)
        self.last[task] = now

    def span(self, task: str) -> float:
        return self.last.get(task, 0.0) - self.first.get(task, 0.0)


def _quartiles(values: list[float]) -> dict[str, float | int]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"n": 0}
    q = np.percentile(finite, [25, 50, 75])
    return {"n": len(finite), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=16, help="units of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="server requests in flight at once (the second timing)")
    parser.add_argument("--no-server", action="store_true", help="skip the llama.cpp server reference")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from lmscope.activations.reader import ActivationStore
    from lmscope.explain.explainer import ExplainerConfig, open_chat_model
    from lmscope.explain.job import ExplainSettings, run_explain
    from lmscope.explain.prompts import clean_explanation, detect_request, explain_request
    from lmscope.explain.records import RecordSettings, UnitRecords, UnitSource
    from lmscope.sae.io import load_sae
    from lmscope.suites.replay import MiniSuiteSource

    begin = time.perf_counter()
    setup = _setup(log)
    sae, _ = load_sae(setup["sae"]["sae"])
    sources = {"feature": UnitSource(ActivationStore.open(setup["sae"]["store"]), sae.shape.hook, sae),
               "neuron": UnitSource(ActivationStore.open(setup["neurons"]), "blocks.1.mlp.hook_post")}
    records = RecordSettings(window=16, after=4, top=2, quantile=1, random=2, quiet=3)
    model = open_chat_model(ExplainerConfig(cache=False, batch_size=8), device="cpu")
    results: dict[str, Any] = {"kinds": {}}
    requests: dict[str, list[Any]] = {"explain": [], "detect": []}
    local_explanations: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, source in sources.items():
            clock = _Clock()
            start = time.perf_counter()
            summary = run_explain(model, source, Path(tmp) / kind, ExplainSettings(n=args.units, records=records),
                                  tokenizer=setup["tokenizer"], replay=MiniSuiteSource(setup["suite"]), progress=clock)
            total = time.perf_counter() - start
            entries = [json.loads((Path(tmp) / kind / "units" / f"{kind}-{u}.json").read_text()) for u in summary["units"]]
            n = len(entries)
            explain_s, score_s = clock.span("explain"), clock.span("score")
            scores = {name: {"own": _quartiles([e["scores"][name] for e in entries]),
                             "shuffled": _quartiles([e["baseline_scores"][name] for e in entries])}
                      for name in ("simulation", "detection", "fuzzing", "detection_auroc", "fuzzing_auroc")}
            results["kinds"][kind] = {
                "hook": source.hook, "units": n, "seconds": total, "explain_s": explain_s, "score_s": score_s,
                "explanations_per_minute": 60 * n / explain_s if explain_s else None,
                "units_scored_per_minute": 60 * n / score_s if score_s else None,
                "scores": scores, "explanations": {str(e["unit"]): e["explanation"] for e in entries},
            }
            log(f"{kind}s: {n} explained in {explain_s:.1f} s, scored (own + shuffled) in {score_s:.1f} s; simulation median "
                f"{scores['simulation']['own'].get('median')} vs shuffled {scores['simulation']['shuffled'].get('median')}")
            for e in entries:
                rec = UnitRecords.from_dict(e["records"])
                requests["explain"].append(explain_request(rec.explain, rec.max_activation, kind))
                requests["detect"] += [detect_request(e["explanation"], kind, r) for r in rec.holdout + rec.quiet]
                local_explanations.append(e["explanation"])

        # The same requests through the local backend alone (no scoring in between), then through the server.
        local: dict[str, float] = {}
        for name, batch in requests.items():
            start = time.perf_counter()
            answers = model.complete_many(batch)
            local[name] = time.perf_counter() - start
            if name == "explain":
                assert [clean_explanation(a.text) for a in answers] == local_explanations  # deterministic: the job's own answers
        results["requests"] = {name: len(batch) for name, batch in requests.items()}
        results["local_s"] = local
        if not args.no_server:
            from llama_server import API_KEY, MODEL_ALIAS, start_server, stop_server
            from lmscope.explain.openai_http import OpenAIChatModel
            from lmscope.models.loading import locate_default_gguf

            os.environ["LMSCOPE_BENCH_KEY"] = API_KEY
            server = start_server(locate_default_gguf(), threads=args.threads)
            try:
                served: dict[str, Any] = {}
                for concurrency in (1, args.concurrency):
                    client = OpenAIChatModel(server.base_url, MODEL_ALIAS, "LMSCOPE_BENCH_KEY", concurrency=concurrency)
                    timing = {}
                    for name, batch in requests.items():
                        start = time.perf_counter()
                        answers = client.complete_many(batch)
                        timing[name] = time.perf_counter() - start
                        if name == "explain" and concurrency == 1:
                            texts = [clean_explanation(a.text) for a in answers]
                            served["explanations_equal_to_local"] = sum(a == b for a, b in zip(texts, local_explanations))
                    served[f"concurrency_{concurrency}_s"] = timing
                    log(f"server, {concurrency} in flight: explain {timing['explain']:.1f} s, detect {timing['detect']:.1f} s "
                        f"(local: {local['explain']:.1f} s, {local['detect']:.1f} s)")
                served["start_s"] = server.start_seconds
                served["threads"] = args.threads
                results["server"] = served
            finally:
                stop_server(server)
    out = {"model": setup["spec"], "explainer": "default (SmolLM2-135M-Instruct, transformers, fp32)", "results": results,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg()), "wall_seconds": time.perf_counter() - begin}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for kind, entry in results["kinds"].items():
            print(f"{kind}s: {entry['explanations_per_minute']:.1f} explanations/min, {entry['units_scored_per_minute']:.1f} "
                  f"units scored/min; simulation {entry['scores']['simulation']}")


if __name__ == "__main__":
    main()
