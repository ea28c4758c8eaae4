"""Tables of ``bench/gpu/run.py``: per shape, each variant's best steady tokens/s over its runs, MFU and
peak GPU memory; then the ratios the targets use, next to the targets."""

from __future__ import annotations

LABELS = {"score": "stage one: `dpocache score --dtype bfloat16`",
          "forward": "bare bf16 `no_grad` forward + log-softmax (stage one's batches)",
          "dpocache": "stage two: `dpocache train --bf16` (defaults)",
          "trl": "TRL `DPOTrainer`, `precompute_ref_log_probs=True`, bf16",
          "bare": "bare HF loop: bf16 autocast forward + backward + fused AdamW",
          "packing": "`dpocache train --bf16 --packing`",
          "liger": "`dpocache train --bf16 --use_liger_kernel true`",
          "compile": "`dpocache train --bf16 --torch_compile`"}
# (ratio, numerator, denominator, measure, target, at least?, which shapes: "all", "first" or "widest")
RATIOS = (("stage one / bare forward", "score", "forward", "tok_s", 0.95, True, "all"),
          ("stage two / TRL precompute", "dpocache", "trl", "tok_s", 1.3, True, "all"),
          ("stage two / bare loop", "dpocache", "bare", "tok_s", 1.0, True, "all"),
          ("packing / padded", "packing", "dpocache", "tok_s", 1.2, True, "first"),
          ("memory / TRL precompute", "dpocache", "trl", "peak_gpu_bytes", 0.75, False, "widest"))


def best(rows: list[dict], shape: str, variant: str) -> dict:
    """Best tokens/s and largest peak GPU memory over the successful runs, every run's rate, last status."""
    runs = [r for r in rows if r.get("shape") == shape and r.get("variant") == variant]
    ok = [r for r in runs if r["status"] == "ok"]
    mem = [r["peak_gpu_bytes"] for r in ok if r.get("peak_gpu_bytes")]
    top = max(ok, key=lambda r: r["tok_s"]) if ok else {}
    return {"tok_s": top.get("tok_s"), "mfu": top.get("mfu"), "peak_gpu_bytes": max(mem) if mem else None,
            "runs": [r.get("tok_s") for r in ok], "status": status_line(runs[-1]) if runs else "not run"}


def status_line(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    detail = row.get("reason") or (row.get("error") or "").strip().splitlines()[-1:] or [""]
    return f"{row['status']}: {detail if isinstance(detail, str) else detail[0]}"[:160]


def summary(rows: list[dict], shapes: list[str]) -> dict:
    """Per shape: each variant's best figures and the target ratios (None when a side did not run)."""
    vocab = {s: spec["vocab"] for r in rows if r.get("variant") == "machine" for s, spec in r["shapes"].items()}
    widest = max(shapes, key=lambda s: vocab.get(s, 0))
    out = {"variants": {}, "ratios": {}}
    for shape in shapes:
        figures = {v: best(rows, shape, v) for v in LABELS}
        out["variants"][shape] = figures
        for name, num, den, measure, target, at_least, where in RATIOS:
            if (where == "first" and shape != shapes[0]) or (where == "widest" and shape != widest):
                continue
            a, b = figures[num][measure], figures[den][measure]
            ratio = round(a / b, 3) if a and b else None
            met = None if ratio is None else (ratio >= target if at_least else ratio <= target)
            out["ratios"].setdefault(shape, {})[name] = {"ratio": ratio, "target": target, "at_least": at_least,
                                                          "met": met}
    return out


def _num(value, digits=0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render(rows: list[dict]) -> str:
    """Markdown: the machine, one table per shape, then the targets."""
    machine = next(r for r in rows if r.get("variant") == "machine")
    build = next((r for r in rows if r.get("variant") == "build"), {})
    summ = next(r for r in rows if r.get("variant") == "summary")
    lines = [f"Device: {build.get('device_name', '?')}; torch {machine.get('torch')}, transformers "
             f"{machine.get('transformers')}, TRL {machine.get('trl')}; sizes {machine['sizes']}", ""]
    for shape, figures in summ["variants"].items():
        params = build.get("params", {}).get(shape) or 0
        lines += [f"### {shape} ({params / 1e6:,.1f}M parameters, {machine['shapes'][shape]})", "",
                  "| variant | tokens/s (best) | runs | MFU | peak GPU GB | status |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for variant, f in figures.items():
            if f["status"] == "not run":
                continue
            runs = ", ".join(_num(x) for x in f["runs"]) or "-"
            mem = f["peak_gpu_bytes"] and f["peak_gpu_bytes"] / 1e9
            mfu = "n/a" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
            lines.append(f"| {LABELS[variant]} | {_num(f['tok_s'])} | {runs} | {mfu} | {_num(mem, 1)} | "
                         f"{f['status'].replace('|', '/')} |")
        lines.append("")
    lines += ["### Targets", "", "| shape | ratio | measured | target | met |", "| --- | --- | --- | --- | --- |"]
    for shape, ratios in summ["ratios"].items():
        for name, r in ratios.items():
            met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
            sign = ">=" if r["at_least"] else "<="
            measured = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            lines.append(f"| {shape} | {name} | {measured} | {sign} {r['target']}x | {met} |")
    return "\n".join(lines)
