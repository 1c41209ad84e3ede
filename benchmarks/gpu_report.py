"""Tables and goals of `python -m benchmarks.gpu`: markdown from the result dict, and the
service's goals next to the measured values.

The GPU goals are for an H200, bf16, the 2B-sized model and 24-token answers: `applies` is
False for any other run (the values are still shown, as a reference). The CPU goal (8 callers
answer >= 2x the requests/s of one) applies to CPU runs. A goal is met only when the requests
it was measured on had 0 errors (`errors`: failed requests of the levels it reads).
"""

from __future__ import annotations

GPU_GOALS_NOTE = "H200, bf16, 2B-sized model, 24-token answers"
FOUR_K, DESKTOP = "3840x2160 web page", "1920x1080 desktop"
# What the first H200 run measured (2026-11-29, before the engine; medians; "-" = not measured).
BEFORE = {f"TTFT pruned, {FOUR_K}": "172 ms", f"TTFT pruned, {DESKTOP}": "105 ms",
          "decode per token at batch 1 (worst size, pruned)": "35-40 ms",
          "32 callers, distinct 1080p screenshots: requests/s": "1.02 with 8 callers",
          f"Ground full - pruned >= TTFT full - pruned, {DESKTOP}": "-286 ms (846 full, 1132 pruned; TTFT gap 37 ms)"}


def _f(value, digits: int = 0, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _goal(name: str, target: str, measured, met, applies: bool, errors: int = 0) -> dict:
    return {"goal": name, "target": target, "measured": measured, "errors": errors,
            "met": None if measured is None else bool(met) and errors == 0, "applies": applies,
            "before": BEFORE.get(name, "-")}


def errors_of(*levels) -> int:
    """Failed requests of these concurrency levels (None = a level not run)."""
    return sum(sum(level.get("errors", {}).values()) for level in levels if level is not None)


def _level(result: dict, callers: int) -> dict | None:
    return next((lv for lv in result.get("concurrency", []) if lv["callers"] == callers), None)


def goals(result: dict) -> list[dict]:
    model = result["model"]
    on_gpu = model["device"].startswith("cuda")
    gpu = on_gpu and model["size"] == "2b" and model["dtype"] == "bfloat16" and model["max_new_tokens"] == 24
    engine = {row["screenshot"]: row for row in result.get("engine", [])}
    out = []
    for label, limit in ((FOUR_K, 60), (DESKTOP, 40)):
        ttft = engine[label]["pruned"]["ttft_ms"] if label in engine else None
        out.append(_goal(f"TTFT pruned, {label}", f"<= {limit} ms", ttft, ttft is not None and ttft <= limit, gpu))
    decode = [row["pruned"]["decode_ms_per_token"] for row in engine.values()
              if row["pruned"]["decode_ms_per_token"] is not None]
    worst = max(decode) if decode else None
    out.append(_goal("decode per token at batch 1 (worst size, pruned)", "<= 8 ms", worst,
                     worst is not None and worst <= 8, gpu))
    one, many = _level(result, 1), _level(result, 32)
    rate = many["requests_per_s"] if many else None
    out.append(_goal("32 callers, distinct 1080p screenshots: requests/s", ">= 25", rate,
                     rate is not None and rate >= 25, gpu, errors_of(many)))
    ratio = many["p50_ms"] / one["p50_ms"] if many and one and one["p50_ms"] and many["p50_ms"] else None
    out.append(_goal("32 callers: p50 latency / single-caller p50", "<= 1.5", ratio,
                     ratio is not None and ratio <= 1.5, gpu, errors_of(one, many)))
    for row in result.get("ground", []):
        full, pruned = row["full"], row["pruned"]
        saved = full["round_trip_ms"] - pruned["round_trip_ms"]
        ttft_gap = full["server_ttft_ms"] - pruned["server_ttft_ms"]
        out.append(_goal(f"Ground full - pruned >= TTFT full - pruned, {row['screenshot']}",
                         f">= {ttft_gap:.0f} ms", saved, saved >= ttft_gap, gpu))
    eight = _level(result, 8)
    speedup = eight["requests_per_s"] / one["requests_per_s"] if eight and one and one["requests_per_s"] else None
    out.append(_goal("CPU: 8 callers' requests/s / one caller's", ">= 2", speedup,
                     speedup is not None and speedup >= 2, not on_gpu, errors_of(one, eight)))
    return out


def header(result: dict) -> list[str]:
    model, machine, serve = result["model"], result["machine"], result["serve"]
    lines = [
        "## GPU benchmark (`python -m benchmarks.gpu`) — RANDOM WEIGHTS",
        "",
        f"Model: {model['label']} (seed 0), {model['parameters'] / 1e9:.3f} B parameters, {model['dtype']} on "
        f"{model['device']} ({machine['accelerator']}), attention {model['attn_implementation']}, "
        f"{model['max_new_tokens']}-token answers. **RANDOM WEIGHTS: the answers are meaningless; the times "
        f"and sizes are those of the real code at this size.**",
        f"Software: torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}; "
        f"{machine['cpu_count']} CPU cores ({machine['cpu']}), {result['settings']['threads']} torch thread(s).",
        f"Serve flags: {' '.join(serve['flags']) or 'none'}; sized for the callers: "
        + (", ".join(f"{name} {value:,}" for name, value in serve.get("sized", {}).items()) or "none") + ".",
        f"Medians of {result['settings']['runs']} runs after one warm-up run"
        + (" (reduced CPU run: --small)." if result["settings"]["small"] else "."),
        "",
        "Screenshots (made from tests/data/corpus):",
    ]
    lines += [f"- {shot['label']}: {shot['made_from']}" for shot in result.get("screenshots", [])]
    return lines


def engine_table(rows: list[dict]) -> list[str]:
    lines = ["| screenshot | kept / total | TTFT full -> pruned (ms) | ViT | LLM prefill | "
             "resize / select / patchify, pruned | KV after prefill (MB) | decode ms/token full / pruned | "
             "end to end full -> pruned (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        full, pruned = row["full"], row["pruned"]
        pair = lambda key: f"{_f(full.get(key))} -> {_f(pruned.get(key))}"  # noqa: E731
        prep = " / ".join(_f(pruned.get(f"{stage}_ms"), 1) for stage in ("resize", "select", "patchify"))
        lines.append(
            f"| {row['screenshot']} | {pruned['kept_blocks']} / {pruned['total_blocks']} | {pair('ttft_ms')} | "
            f"{pair('vit_ms')} | {pair('prefill_ms')} | {prep} | "
            f"{full['kv_cache_bytes'] / 1e6:.1f} -> {pruned['kv_cache_bytes'] / 1e6:.1f} | "
            f"{_f(full['decode_ms_per_token'], 1)} / {_f(pruned['decode_ms_per_token'], 1)} | "
            f"{pair('end_to_end_ms')} |")
    return lines


KNOWN_STAGES = ("resize_ms", "select_ms", "patchify_ms", "vit_ms", "prefill_ms", "decode_tokens_ms", "ttft_ms",
                "end_to_end_ms")


def other_stages(rows: list[dict]) -> list[str]:
    """A line naming stage times the engine reports beyond KNOWN_STAGES (e.g. new device stages)."""
    extra = sorted({key for row in rows for key in row["pruned"] if key.endswith("_ms")} - set(KNOWN_STAGES))
    if not extra:
        return []
    cells = [f"{key[:-3]} " + ", ".join(f"{_f(row['pruned'][key], 1)}" for row in rows) for key in extra]
    return ["", "Other stages the engine reported (pruned, ms, in the table's order): " + "; ".join(cells) + "."]


def device_table(result: dict) -> list[str]:
    """Attention kernel per phase, and per part the CUDA graphs held, eager decode steps and KV pool positions."""
    device = result.get("device", {})
    attention = device.get("attention", {})
    graphs = "CUDA graphs" if attention.get("decode_cuda_graphs") else "no CUDA graphs"
    lines = [f"Attention: ViT {attention.get('vit')}, text prefill {attention.get('prefill')}, decode "
             f"{attention.get('decode')} ({graphs}).", "",
             "| part | CUDA graphs held | eager decode steps | KV pool positions |", "| --- | ---: | ---: | ---: |"]
    engine = device.get("engine")
    if engine is not None:
        lines.append(f"| engine, batch 1 (StepStats) | {engine['cuda_graphs']} | {engine['eager_steps']} | "
                     f"{_f(device.get('kv_cache_capacity_tokens'))} |")
    for level in result.get("concurrency", []):
        lines.append(f"| server after {level['callers']} caller(s) (metrics) | {_f(level.get('cuda_graphs'))} | "
                     f"{_f(level.get('eager_steps_total'))} total | {_f(level.get('kv_cache_capacity_tokens'))} |")
    return lines


def ground_table(rows: list[dict]) -> list[str]:
    lines = ["| screenshot | Ground round trip full -> pruned (ms) | server TTFT full -> pruned (ms) | "
             "kept / total |", "| --- | --- | --- | --- |"]
    for row in rows:
        full, pruned = row["full"], row["pruned"]
        lines.append(f"| {row['screenshot']} | {_f(full['round_trip_ms'])} -> {_f(pruned['round_trip_ms'])} | "
                     f"{_f(full['server_ttft_ms'])} -> {_f(pruned['server_ttft_ms'])} | "
                     f"{pruned['kept_blocks']} / {pruned['total_blocks']} |")
    return lines


def concurrency_table(levels: list[dict]) -> list[str]:
    lines = ["| callers | answered / sent / planned | errors | requests/s | p50 ms | p90 ms | server queue p50 ms | "
             "server TTFT p50 ms |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for lv in levels:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(lv["errors"].items())) or "0"
        lines.append(f"| {lv['callers']} | {lv['answered']} / {lv['sent']} / {lv.get('planned', '-')} | {errors} | "
                     f"{_f(lv['requests_per_s'], 2)} | {_f(lv['p50_ms'])} | {_f(lv['p90_ms'])} | "
                     f"{_f(lv['server_queue_p50_ms'])} | {_f(lv['server_ttft_p50_ms'])} |")
    return lines


def goals_table(rows: list[dict]) -> list[str]:
    lines = ["| goal | target | before (H200, 2026-11-29) | measured | errors | met |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for g in rows:
        met = "-" if g["met"] is None else ("yes" if g["met"] else "no")
        if g["measured"] is not None and g["errors"]:
            met += " (errors)"
        if not g["applies"]:
            met += " (reference only: not this goal's setting)"
        lines.append(f"| {g['goal']} | {g['target']} | {g['before']} | {_f(g['measured'], 2)} | {g['errors']} | "
                     f"{met} |")
    return lines


def markdown(result: dict) -> str:
    lines = header(result)
    engine = result.get("engine", [])
    lines += ["", "### Engine, batch 1 (RANDOM WEIGHTS)", ""] + engine_table(engine) + other_stages(engine)
    lines += ["", "### The device: attention kernels, CUDA graphs, eager steps, KV pool", ""]
    lines += device_table(result)
    if "ground" in result:
        lines += ["", "### Through `Ground`, one caller (RANDOM WEIGHTS)", ""] + ground_table(result["ground"])
    if "concurrency" in result:
        lines += ["", "### Concurrent callers, distinct 1080p PNG screenshots (RANDOM WEIGHTS)", ""]
        lines += concurrency_table(result["concurrency"])
    lines += ["", f"### Goals (GPU goals: {GPU_GOALS_NOTE}; met only with 0 errors)", ""]
    lines += goals_table(goals(result))
    return "\n".join(lines)
