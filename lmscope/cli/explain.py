"""``lmscope explain``: a language model explains SAE features or neurons, and is scored for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.errors import LmscopeError


def _units(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(u) for u in text.split(","))
    except ValueError:
        raise LmscopeError(f"--units {text!r} is not a comma-separated list of integers, e.g. 3,17,40.") from None


def _fmt(value: object) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"  # NaN != NaN


@app.command("explain")
def explain(
    out: Annotated[Path, typer.Option("--out", help="Directory for explanations, scores and records (rerun to resume).")],
    sae: Annotated[Path | None, typer.Option("--sae", help="An SAE directory (lmscope's or SAELens's format): explain its features.")] = None,
    neurons: Annotated[str | None, typer.Option("--neurons", help="A hook (e.g. blocks.1.mlp.hook_post): explain its neurons.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Activation store with the hook (default for an lmscope SAE: the one it was trained on).")] = None,
    n: Annotated[int, typer.Option("--n", help="Units drawn (seeded) among those that fire on 0.01 %–90 % of the tokens.")] = 8,
    units: Annotated[str | None, typer.Option("--units", help="Explicit units instead of a draw: 3,17,40.")] = None,
    explainer: Annotated[str, typer.Option("--explainer", help="Explainer model: a local model spec (default: SmolLM2-135M-Instruct), or with --base-url the served model id.")] = "default",
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, ollama, a hosted service).")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the server's API key.")] = "OPENAI_API_KEY",
    window: Annotated[int, typer.Option(help="Tokens per record.")] = 24,
    top: Annotated[int, typer.Option(help="Top-activating records shown to the explainer, and as many held out for scoring.")] = 3,
    quantile: Annotated[int, typer.Option(help="Records from lower activation quantiles, shown and held out.")] = 1,
    random: Annotated[int, typer.Option(help="Random records the simulator also scores.")] = 3,
    quiet: Annotated[int, typer.Option(help="Non-activating records, detection's negatives.")] = 4,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also score each unit with another unit's explanation (chance level).")] = True,
    suite: Annotated[Path | None, typer.Option("--suite", help="The mini suite whose corpus the store holds: training steps of each record.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Model spec whose tokenizer shows the tokens (default: the store's model).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Cache the explainer's answers under $LMSCOPE_HOME/explain-cache.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the unit draw, the records and the baseline's shuffle.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> None:
    """Explain SAE features or neurons with a language model; score each explanation by simulation, detection and fuzzing."""
    from lmscope.explain.explainer import ExplainerConfig, open_chat_model
    from lmscope.explain.job import ExplainSettings, open_units, run_explain
    from lmscope.explain.records import RecordSettings
    from lmscope.models.loading import load_tokenizer

    source = open_units(sae=sae, neurons=neurons, store=store)
    settings = ExplainSettings(n=n, units=_units(units), seed=seed, baseline=baseline,
                               records=RecordSettings(window=window, after=min(4, window - 1), top=top, quantile=quantile,
                                                      random=random, quiet=quiet, seed=seed))
    spec = tokenizer or source.store.meta.get("model")
    tok = load_tokenizer(spec) if spec else None
    replay = None
    if suite is not None:
        from lmscope.suites.replay import MiniSuiteSource

        replay = MiniSuiteSource(suite)
    model = open_chat_model(ExplainerConfig(model=explainer, base_url=base_url, api_key_env=api_key_env, cache=cache),
                            device=device, dtype=dtype)
    with progress_bars(enabled=not json_output) as progress:
        summary = run_explain(model, source, out, settings, tokenizer=tok, replay=replay, progress=progress)
    summary["out"] = str(out)
    if json_output:
        print_json(summary)
        return
    import pyarrow.parquet as pq

    table = pq.read_table(out / "explanations.parquet").to_pylist()
    rows = [{"unit": r["unit"], "explanation": r["explanation"], "simulation": _fmt(r["simulation"]),
             "shuffled": _fmt(r.get("baseline_simulation")), "detection": _fmt(r["detection"]), "fuzzing": _fmt(r["fuzzing"]),
             "density": f"{r['density']:.3f}"} for r in table]
    print_table(rows, title=f"{source.kind}s of {source.hook}")
    med, base = summary["median"], summary["baseline_median"]
    stdout.print(f"median simulation {_fmt(med['simulation'])} (shuffled {_fmt(base['simulation'])}), detection "
                 f"{_fmt(med['detection'])} ({_fmt(base['detection'])}), fuzzing {_fmt(med['fuzzing'])} ({_fmt(base['fuzzing'])}) → {out}",
                 highlight=False)
