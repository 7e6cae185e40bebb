"""Turning ``specrun bench`` measurements into numbers people read: the per-configuration summary,
the Markdown report, the PNG plots and the README's performance section.  Everything here is a
function of the results dictionary (what ``results.json`` holds), so a report can be re-rendered
from a saved run."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SCHEMA = "specrun-bench/1"
ACCEPTANCE_PNG = "acceptance_by_position.png"
TOKENS_PNG = "tokens_per_second.png"

# --------------------------------------------------------------------------- pairing and summary


def pair_with_plain(results: dict) -> None:
    """Fill each measurement's speed-up and greedy identity against the plain run of the same system,
    prompt and repeat (the run next to it in the interleaved schedule)."""
    plain_of = {s["name"]: s["plain"] for s in results["systems"]}
    plain: dict[tuple, dict] = {}
    for m in results["measurements"]:
        if m["config"] == plain_of.get(m["system"]):
            plain[(m["system"], m["prompt"], m["repeat"])] = m
    for m in results["measurements"]:
        if m["config"] == plain_of.get(m["system"]):
            m["speedup_vs_plain"], m["latency_speedup_vs_plain"] = 1.0, 1.0
            m["identical_to_plain"], m["first_difference"] = None, None
            continue
        p = plain.get((m["system"], m["prompt"], m["repeat"]))
        if p is None:  # an interrupted run: the partner was not measured
            m["speedup_vs_plain"] = m["latency_speedup_vs_plain"] = None
            m["identical_to_plain"] = m["first_difference"] = None
            continue
        m["speedup_vs_plain"] = _ratio(m["tokens_per_second"], p["tokens_per_second"])
        m["latency_speedup_vs_plain"] = _ratio(p["total_seconds"], m["total_seconds"])
        m["identical_to_plain"] = m["token_ids"] == p["token_ids"]
        m["first_difference"] = _first_difference(m["token_ids"], p["token_ids"])
    ref = results["settings"].get("reference")
    if ref in plain_of:  # every run against the reference system's plain run on the same prompt and repeat
        for m in results["measurements"]:
            r = plain.get((ref, m["prompt"], m["repeat"]))
            m["speedup_vs_reference"] = None if r is None else _ratio(m["tokens_per_second"], r["tokens_per_second"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b or a <= 0 or b <= 0:
        return None
    return a / b


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def spread(values: Iterable[float | None]) -> dict | None:
    """median, quartiles, extremes and mean of the values that are not None."""
    v = [float(x) for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None
    a = np.asarray(v)
    return {
        "n": len(v),
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def summarize(results: dict) -> dict:
    """Per system and configuration: acceptance, speed and identity figures."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for m in results["measurements"]:
        by[(m["system"], m["config"])].append(m)
    out: dict[str, dict] = {}
    for s in results["systems"]:
        out[s["name"]] = {}
        for c in s["configs"]:
            ms = by.get((s["name"], c), [])
            out[s["name"]][c] = _summarize_config(ms, plain=c == s["plain"])
    return out


def _summarize_config(ms: list[dict], plain: bool) -> dict:
    calls = sum(m["target_calls"] for m in ms)
    dec = sum(m["decode_tokens"] for m in ms)
    per_prompt_al = [m["acceptance_length"] for m in ms if m["target_calls"]]
    drafted = _sum_lists(m.get("drafted_per_position") for m in ms)
    accepted = _sum_lists(m.get("accepted_per_position") for m in ms)
    hist = _sum_lists(m.get("tokens_per_call") for m in ms)
    compared = [m["identical_to_plain"] for m in ms if m.get("identical_to_plain") is not None]
    al = spread(per_prompt_al)
    return {
        "runs": len(ms),
        "draft_runs_on": next((m["draft_runs_on"] for m in ms if m.get("draft_runs_on")), ""),
        "prompts": len({m["prompt"] for m in ms}),
        "new_tokens": sum(m["new_tokens"] for m in ms),
        "target_calls": calls,
        "acceptance_length": {
            "mean": dec / calls if calls else None,  # pooled: all tokens over all target calls
            "per_prompt": al,
        },
        "tokens_per_call": hist,  # [calls that produced 1 token, 2 tokens, ...]
        "tokens_per_call_fraction": [h / sum(hist) for h in hist] if hist and sum(hist) else None,
        "acceptance_rate_per_position": [a / d if d else None for a, d in zip(accepted, drafted, strict=False)]
        if drafted
        else None,
        "drafted_per_position": drafted or None,
        "tokens_per_second": spread(m["tokens_per_second"] or None for m in ms),
        "time_to_first_token": spread(m["time_to_first_token"] for m in ms),
        "speedup_vs_plain": None if plain else spread(m.get("speedup_vs_plain") for m in ms),
        "speedup_vs_reference": spread(m.get("speedup_vs_reference") for m in ms),
        "speedup_geomean": None if plain else _geomean(m.get("speedup_vs_plain") for m in ms),
        "latency_speedup_vs_plain": None if plain else spread(m.get("latency_speedup_vs_plain") for m in ms),
        "greedy_identical": None if plain else {"identical": sum(compared), "compared": len(compared)},
        "all_identical": None if plain or not compared else all(compared),
        "distinct_4grams": spread(distinct_ngrams(m["token_ids"]) for m in ms if m.get("token_ids")),
    }


def distinct_ngrams(tokens: Sequence[int], n: int = 4) -> float | None:
    """The share of a text's n-grams (token ids) that are distinct: ~0.6 for this project's default
    model's answers at its GGUF's Q4_1, lower where a quantization degenerates into loops (which also
    hands prompt lookup easy drafts, so its speed-up is then no like-for-like comparison).  None
    below n + 1 tokens."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if len(grams) > 1 else None


def _sum_lists(lists: Iterable[Sequence[int] | None]) -> list[int]:
    total: list[int] = []
    for lst in lists:
        if not lst:
            continue
        if len(lst) > len(total):
            total.extend([0] * (len(lst) - len(total)))
        for i, x in enumerate(lst):
            total[i] += x
    return total


def _geomean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x]
    return float(math.exp(sum(math.log(x) for x in v) / len(v))) if v else None


def per_category(results: dict) -> dict[str, dict[str, dict]]:
    """category -> "system/config" -> pooled acceptance length and median speed-up."""
    plain_of = {s["name"]: s["plain"] for s in results["systems"]}
    acc: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for m in results["measurements"]:
        if m["config"] != plain_of.get(m["system"]) and m.get("category"):
            acc[m["category"]][f"{m['system']}/{m['config']}"].append(m)
    out: dict[str, dict[str, dict]] = {}
    for cat in sorted(acc):
        out[cat] = {}
        for key, ms in acc[cat].items():
            calls = sum(m["target_calls"] for m in ms)
            sp = spread(m.get("speedup_vs_plain") for m in ms)
            out[cat][key] = {
                "acceptance_length": sum(m["decode_tokens"] for m in ms) / calls if calls else None,
                "speedup_median": sp["median"] if sp else None,
                "runs": len(ms),
            }
    return out


# --------------------------------------------------------------------------- formatting


def _f(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _tps(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{s['median']:.1f} ({s['p25']:.1f}–{s['p75']:.1f})"


def _speedup(s: dict | None) -> str:
    if not s:
        return "–"
    return f"**{s['median']:.2f}×** ({s['p25']:.2f}–{s['p75']:.2f})"


def _ttft(s: dict | None) -> str:
    return "–" if not s else f"{s['median'] * 1000:.0f} ms"


def _al(summary: dict) -> str:
    a = summary["acceptance_length"]
    if a["mean"] is None:
        return "–"
    pp = a["per_prompt"]
    if not pp:
        return f"{a['mean']:.2f}"
    return f"{a['mean']:.2f} ({pp['median']:.2f} / {pp['p90']:.2f})"


def _rates(rates: Sequence[float | None] | None) -> str:
    if not rates:
        return "–"
    return " · ".join("–" if r is None else f"{r:.2f}" for r in rates)


def _identical(summary: dict) -> str:
    g = summary["greedy_identical"]
    if not g or not g["compared"]:
        return "–"
    mark = "" if g["identical"] == g["compared"] else " ⚠"
    return f"{g['identical']}/{g['compared']}{mark}"


def _hist(summary: dict) -> str:
    h = summary.get("tokens_per_call_fraction")
    if not h:
        return "–"
    return " · ".join(f"{x * 100:.0f}%" for x in h)


def machine_line(results: dict) -> str:
    mc = results.get("machine", {})
    parts = [mc.get("cpu") or "unknown CPU"]
    if mc.get("logical_cpus"):
        cores = f"{mc['logical_cpus']} logical CPUs"
        if mc.get("usable_cpus") and mc["usable_cpus"] != mc["logical_cpus"]:
            cores += f" ({mc['usable_cpus']} usable)"
        parts.append(cores)
    if mc.get("memory_gib"):
        parts.append(f"{mc['memory_gib']:.0f} GiB RAM")
    if mc.get("gpu"):
        parts.append(f"GPU: {mc['gpu']}")
    if mc.get("os"):
        parts.append(mc["os"])
    return ", ".join(parts)


def versions_line(results: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items() if v)


def _dataset_line(results: dict) -> str:
    st = results["settings"]
    n = len(results["prompts"])
    templ = "chat template applied" if st.get("chat_template", True) else "raw prompts"
    tree = st.get("tree")
    tree = f" (eagle3: dynamic tree, depth {tree[0]}, top-{tree[1]}, {tree[2]} nodes)" if tree else ""
    if st.get("draft_min_prob"):
        tree += f" (eagle3: a chain stops at a step whose top draft probability is < {st['draft_min_prob']:g})"
    if st.get("draft_gate") is not None:
        tree += (" (draft gate: model-backed drafters draft only while their drafts measure faster than plain steps; "
                 "prompt lookup drafts the length with the most expected tokens per measured second)" if st["draft_gate"]
                 else " (every call drafts: --no-draft-gate)")
    return (
        f"{st['dataset']}, {n} prompt{'s' * (n != 1)}, up to {st['max_new_tokens']} new tokens, greedy, "
        f"k = {st['num_draft_tokens']} draft tokens{tree}, {st['warmup']} warm-up round(s), {st['repeats']} repeat(s), "
        f"{templ}"
    )


def _system_title(s: dict) -> str:
    if s["kind"] == "baseline":
        return f"Outside baseline: {s.get('title') or 'transformers `generate`'} ({s['device']}, {s['precision']})"
    inexact = "; blocks round otherwise than single steps, so outputs may differ from plain" if s.get("exact_blocks") is False else ""
    return f"`{s['name']}` ({s['device']}, {s['precision']}{inexact})"


def _method(s: dict, c: str, k: int) -> str:
    """A baseline configuration's label (results of older versions have transformers only)."""
    if "methods" in s:
        return s["methods"][c]
    return "`generate` (plain)" if c == s["plain"] else f"`generate(prompt_lookup_num_tokens={k})`"


def _reference_rows(results: dict, summary: dict) -> list[str]:
    """Every configuration against the reference system's plain decoding (per-prompt ratios)."""
    ref = results["settings"].get("reference")
    if not ref or ref not in summary:
        return []
    lines = [f"## Against {ref} plain decoding", "",
             f"Median over prompts of tokens/s divided by {ref}'s plain tokens/s on the same prompt (IQR). "
             "Distinct 4-grams: median share of an answer's 4-grams that occur once — a weight format that "
             "degenerates into loops scores low and hands prompt lookup easy drafts, so compare speeds of "
             "formats whose share is alike.", "",
             "| system | precision | drafter | tokens/s (median) | vs " + ref + " plain | distinct 4-grams |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in results["systems"]:
        for c in s["configs"]:
            sm = summary[s["name"]][c]
            label = _method(s, c, results["settings"]["num_draft_tokens"]) if s["kind"] == "baseline" else c
            d4 = sm.get("distinct_4grams")
            lines.append(f"| {s['name']} | {s['precision']} | {label} | {_tps(sm['tokens_per_second'])} "
                         f"| {_speedup(sm.get('speedup_vs_reference'))} | {_f(d4 and d4['median'])} |")
    return [*lines, ""]


def render_markdown(results: dict) -> str:
    summary = results.get("summary") or summarize(results)
    st = results["settings"]
    lines = [f"# specrun bench: {st['dataset']}", ""]
    if results.get("partial"):
        lines += [
            f"> **Partial run** ({results.get('stopped_by') or 'interrupted'}): only what was measured before it stopped "
            f"is reported ({len(results['measurements'])} of {results.get('planned_runs', '?')} runs).",
            "",
        ]
    lines += [
        f"- **Command:** `{results['command']}`",
        f"- **Machine:** {machine_line(results)}",
        f"- **Software:** {versions_line(results)}",
        f"- **Model:** {st.get('target_name')} (`{st.get('model_dir')}`)",
        f"- **Workload:** {_dataset_line(results)}",
        f"- **Date:** {results.get('started_at', '?')} (took {_f(results.get('elapsed_seconds'), '.0f', ' s')})",
    ]
    if results.get("skipped_prompts"):
        lines.append(f"- **Skipped prompts:** {len(results['skipped_prompts'])} (see results.json)")
    lines += [
        "",
        "Acceptance length = tokens produced per target call after the prefill (mean over all calls; per-prompt "
        "median / p90 in brackets). Tokens/s = decode throughput after the first token, median over runs (IQR). "
        "Speed-up = median of the ratios speculative / plain tokens/s, each pair measured back to back on the same "
        "prompt (IQR). Greedy identical = runs whose tokens equal plain decoding's on the same backend.",
        "",
    ]
    for s in results["systems"]:
        if s["kind"] != "specrun":
            continue
        lines += [f"## {_system_title(s)}", ""]
        lines += [
            "| drafter | acceptance length | acceptance rate by draft position | tokens/s | time to first token "
            "| speed-up vs plain | greedy identical |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in s["configs"]:
            sm = summary[s["name"]][c]
            label = f"{c} (plain)" if c == s["plain"] else c
            if sm.get("draft_runs_on"):
                label += f" (draft on {sm['draft_runs_on']})"
            lines.append(
                f"| {label} | {_al(sm)} | {_rates(sm['acceptance_rate_per_position'])} | {_tps(sm['tokens_per_second'])} "
                f"| {_ttft(sm['time_to_first_token'])} | {'1.00×' if c == s['plain'] else _speedup(sm['speedup_vs_plain'])} "
                f"| {'–' if c == s['plain'] else _identical(sm)} |"
            )
        spec = [c for c in s["configs"] if c != s["plain"]]
        if spec:
            k = max([st["num_draft_tokens"]] + [len(summary[s["name"]][c].get("tokens_per_call") or []) - 1 for c in spec])
            head = " | ".join(f"{i}" for i in range(1, k + 2))
            lines += [
                "",
                "Tokens produced per target call (share of calls):",
                "",
                f"| drafter | {head} |",
                "| --- |" + " --- |" * (k + 1),
            ]
            for c in spec:
                frac = summary[s["name"]][c].get("tokens_per_call_fraction") or []
                cells = [f"{x * 100:.0f}%" for x in frac] + ["–"] * (k + 1 - len(frac))
                lines.append(f"| {c} | " + " | ".join(cells[: k + 1]) + " |")
        lines.append("")
    for s in results["systems"]:
        if s["kind"] != "baseline":
            continue
        lines += [f"## {_system_title(s)}", ""]
        plain_runs = {
            sys_["name"]: summary_identity_with(results, s["name"], s["plain"], sys_["name"], sys_["plain"])
            for sys_ in results["systems"]
            if sys_["kind"] == "specrun"
        }
        lines += [
            "| method | acceptance length | tokens/s | time to first token | speed-up vs plain | greedy identical |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in s["configs"]:
            sm = summary[s["name"]][c]
            label = _method(s, c, st["num_draft_tokens"])
            lines.append(
                f"| {label} | {_f(sm['acceptance_length']['mean'])} | {_tps(sm['tokens_per_second'])} "
                f"| {_ttft(sm['time_to_first_token'])} | {'1.00×' if c == s['plain'] else _speedup(sm['speedup_vs_plain'])} "
                f"| {'–' if c == s['plain'] else _identical(sm)} |"
            )
        if plain_runs:
            same = ", ".join(f"`{b}` {v}" for b, v in plain_runs.items())
            lines += ["", f"Plain decoding's tokens equal to specrun's plain decoding: {same}."]
        lines.append("")
    lines += _reference_rows(results, summary)
    spec_systems = [s for s in results["systems"] if any(c != s["plain"] for c in s["configs"])]
    lines += ["## Speed-up over all configurations", ""]
    lines += ["| system | drafter | speed-up (median) | geometric mean | end-to-end latency speed-up |", "| --- | --- | --- | --- | --- |"]
    for s in spec_systems:
        for c in s["configs"]:
            if c == s["plain"]:
                continue
            sm = summary[s["name"]][c]
            lat = sm["latency_speedup_vs_plain"]
            lines.append(
                f"| {s['name']} | {c} | {_f(sm['speedup_vs_plain'] and sm['speedup_vs_plain']['median'], '.2f', '×')} "
                f"| {_f(sm['speedup_geomean'], '.2f', '×')} | {_f(lat and lat['median'], '.2f', '×')} |"
            )
    lines.append("")
    cats = per_category(results)
    if len(cats) > 1:
        keys = sorted({k for v in cats.values() for k in v})
        lines += ["## Acceptance length by category", "", "| category | " + " | ".join(keys) + " |",
                  "| --- |" + " --- |" * len(keys)]
        for cat, row in cats.items():
            cells = []
            for k in keys:
                v = row.get(k)
                cells.append("–" if not v else f"{_f(v['acceptance_length'])} ({_f(v['speedup_median'], '.2f', '×')})")
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: acceptance length (median speed-up).", ""]
    lines += ["## Plots", "", f"![acceptance rate by draft position]({ACCEPTANCE_PNG})", "",
              f"![tokens/s by backend and drafter]({TOKENS_PNG})", ""]
    lines += ["Every raw measurement (per prompt and configuration, with token ids) is in `results.json`.", ""]
    return "\n".join(lines)


def summary_identity_with(results: dict, sys_a: str, cfg_a: str, sys_b: str, cfg_b: str) -> str:
    """How many runs of (sys_a, cfg_a) produced the same tokens as (sys_b, cfg_b) on the same prompt and repeat."""
    b = {(m["prompt"], m["repeat"]): m["token_ids"] for m in results["measurements"]
         if m["system"] == sys_b and m["config"] == cfg_b}
    same = total = 0
    for m in results["measurements"]:
        if m["system"] == sys_a and m["config"] == cfg_a and (m["prompt"], m["repeat"]) in b:
            total += 1
            same += m["token_ids"] == b[(m["prompt"], m["repeat"])]
    return f"{same}/{total}"


def render_readme_section(results: dict, heading: str = "## Performance") -> str:
    """A compact "Performance" section for the README, generated from a results.json."""
    summary = results.get("summary") or summarize(results)
    st = results["settings"]
    lines = [heading, ""]
    lines += [
        f"Measured with `specrun bench` on **{machine_line(results)}**, {results.get('started_at', '?')[:10]}: "
        f"{_dataset_line(results)}; model {st.get('target_name')}. Software: {versions_line(results)}.",
        "",
        f"```bash\n{results['command']}\n```",
        "",
    ]
    if results.get("partial"):
        lines += ["*(Partial run: interrupted before every prompt was measured.)*", ""]
    ref = st.get("reference") if st.get("reference") in summary else None
    lines += [
        "| system | precision | drafter | acceptance length | tokens/s (median) | speed-up vs plain | greedy identical |"
        + (f" vs {ref} plain |" if ref else "") + " distinct 4-grams |",
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if ref else "") + " --- |",
    ]
    for s in results["systems"]:
        for c in s["configs"]:
            sm = summary[s["name"]][c]
            plain = c == s["plain"]
            name = s.get("short", "transformers `generate`") if s["kind"] == "baseline" else f"`{s['name']}`"
            if s["kind"] == "baseline":
                label = "none" if plain else f"prompt lookup (k={st['num_draft_tokens']})"
            else:
                label = c
            tps = sm["tokens_per_second"]
            vs_ref = sm.get("speedup_vs_reference")
            lines.append(
                f"| {name} | {s['precision']} | {label} | {_f(sm['acceptance_length']['mean'])} "
                f"| {_f(tps and tps['median'], '.1f')} "
                f"| {'1.00×' if plain else _f(sm['speedup_vs_plain'] and sm['speedup_vs_plain']['median'], '.2f', '×')} "
                f"| {'–' if plain else _identical(sm)} |" + (f" {_f(vs_ref and vs_ref['median'], '.2f', '×')} |" if ref else "")
                + f" {_f(sm.get('distinct_4grams') and sm['distinct_4grams']['median'])} |"
            )
    lines += [
        "",
        "Acceptance length: tokens per target call (1.00 for plain decoding). Tokens/s: decode throughput after "
        "the first token. Speed-up: median of per-prompt ratios against plain decoding on the same backend, "
        "measured back to back. Distinct 4-grams: median share of an answer's 4-grams that occur once (low: the "
        "format degenerates into loops, which prompt lookup drafts easily). Regenerate with "
        "`specrun bench --readme results.json`.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

_COLORS = {
    "none": "#9e9e9e", "generate": "#9e9e9e", "ngram": "#1f77b4", "prompt_lookup": "#17becf",
    "model": "#ff7f0e", "eagle3": "#2ca02c",
}


def _color(name: str, i: int) -> str:
    return _COLORS.get(name, f"C{(i + 3) % 10}")


def plot_acceptance(results: dict, path) -> None:
    from matplotlib.figure import Figure

    summary = results.get("summary") or summarize(results)
    k = max([results["settings"]["num_draft_tokens"]] + [
        len(sm.get("acceptance_rate_per_position") or []) for per in summary.values() for sm in per.values()])
    fig = Figure(figsize=(7, 4.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    markers, styles = "osD^v<>p*h", ("-", "--", ":", "-.")
    n = 0
    for si, s in enumerate(results["systems"]):  # colour = drafter (as in the tokens/s plot), line style = backend
        for ci, c in enumerate(s["configs"]):
            rates = summary[s["name"]][c].get("acceptance_rate_per_position")
            if c == s["plain"] or not rates:
                continue
            xs = [i + 1 for i, r in enumerate(rates) if r is not None]
            ys = [r for r in rates if r is not None]
            ax.plot(xs, ys, marker=markers[si % len(markers)], linestyle=styles[si % len(styles)], color=_color(c, ci),
                    label=f"{s['name']} · {c}")
            n += 1
    if n == 0:
        ax.text(0.5, 0.5, "no speculative configuration measured", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlim(0.5, k + 0.5)
    ax.set_xticks(range(1, k + 1))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of drafts accepted up to this position")
    fig.suptitle(f"Acceptance rate by draft position ({_short_dataset(results)}, k = {k})", fontsize=10)
    _subtitle(ax, results)
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png")


def plot_tokens_per_second(results: dict, path) -> None:
    from matplotlib.figure import Figure

    summary = results.get("summary") or summarize(results)
    systems = results["systems"]
    fig = Figure(figsize=(max(6.0, 1.9 * len(systems) + 2.5), 4.4), dpi=120, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(s["configs"]) for s in systems) if systems else 0.8
    seen: set[str] = set()
    top = 0.0
    for gi, s in enumerate(systems):
        configs = s["configs"]
        for ci, c in enumerate(configs):
            sm = summary[s["name"]][c]
            t = sm["tokens_per_second"]
            if not t:
                continue
            x = gi - 0.4 + width * (ci + 0.5) + (0.8 - width * len(configs)) / 2
            plain = c == s["plain"]
            label = "plain decoding" if plain else c
            ax.bar(x, t["median"], width * 0.92, color=_color(c, ci), hatch="//" if plain else None,
                   edgecolor="white" if not plain else "#616161",
                   yerr=[[t["median"] - t["p25"]], [t["p75"] - t["median"]]], capsize=3,
                   label=None if label in seen else label)
            seen.add(label)
            top = max(top, t["p75"])
            sp = sm.get("speedup_vs_plain")
            if not plain and sp:
                ax.annotate(f"{sp['median']:.2f}×", (x, t["p75"]), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=8)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels([f"{s['name']}\n{s['device']} {s['precision']}" for s in systems], fontsize=9)
    ax.set_ylabel("decode tokens/s (median, IQR)")
    ax.set_ylim(0, top * 1.4 if top else 1)  # room for the labels and the legend
    fig.suptitle(f"Decode tokens/s by backend × drafter ({_short_dataset(results)}, {len(results['prompts'])} prompts)",
                 fontsize=10)
    _subtitle(ax, results)
    ax.grid(axis="y", alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="upper left", ncols=min(len(seen), 4), title="n.nn× = speed-up over plain decoding",
                  title_fontsize=8)
    fig.savefig(path, format="png")


def _short_dataset(results: dict) -> str:
    name = results["settings"]["dataset"]
    return name if name in ("mt-bench", "humaneval", "sharegpt") else Path(name).name


def _subtitle(ax, results: dict) -> None:
    text = machine_line(results)
    if len(text) > 110:
        text = text[:107] + "..."
    if results.get("partial"):
        text = "PARTIAL RUN · " + text
    ax.set_title(text, fontsize=7, color="#616161")
