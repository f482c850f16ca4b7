"""The anchor benchmark's report: a markdown table, report.json and a PNG (anchors.png)."""
from __future__ import annotations

import json
from pathlib import Path


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _load_warning(m: dict) -> str:
    load = (m.get("load_average_at_start") or [0])[0]
    if not m.get("cores") or load <= m["cores"]:
        return ""
    return (f" **The machine was busy with other work (load {load} on {m['cores']} cores): the scheduler shares CPU "
            "per process, so rows with more processes (agents, RPC servers, concurrent sessions) get more of it than "
            "the single-node rows, and every figure here is noisy.**")


def _breakdown_text(b: dict) -> str:
    rpc = ("" if b["rpc_added_ms"] is None else
           f" llama.cpp's RPC mode adds {b['rpc_added_ms']:.2f} ms per token over its own single node.")
    return (f"Where a generated token's time goes (medians, ms): the single node {b['single_ms']:.2f} (llama.cpp "
            f"{b['single_compute_ms']:.2f}); our agents {b['ours_ms']:.2f}: their own compute "
            f"{b['agents_compute_ms']:.2f} (three llama.cpp graphs in three processes, and each step's handling), "
            f"the hops {b['hops_ms']:.2f} (the driver's time per stage beyond the agent's, all three stages), "
            f"the driver's sampling and loop {b['driver_ms']:.2f}. Ours adds {b['ours_added_ms']:.2f} ms per "
            f"token over the single node.{rpc}")


def summary(res: dict) -> str:
    h = res["headline"]
    sp = res["speed"]
    m = res["machine"]
    lines = [f"# Anchor benchmark: {res['model']['name']} ({res['model']['architecture']}, {res['model']['layers']} "
             f"layers, {res['model']['file_type']}), split {res['split']}, {res['threads']} llama.cpp thread(s) "
             "per stage", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load average at start {m['load_average_at_start']}; "
             f"the whole run took {res['wall_s']} s. On 2 cores three agents, the driver and the auditor share "
             "the CPU, so audits compete with generation." + _load_warning(m), "",
             "| approach | generation tok/s | over single node | prefill tok/s | target |", "|---|---|---|---|---|",
             f"| single node, llama-cpp-python in process | {_f(sp['single_tokens_per_s'], '{:.1f}')} | 1 | "
             f"{_f(sp['single_prefill_tokens_per_s'], '{:.0f}')} | |",
             f"| our split in process (its own alternation with the unsplit model, "
             f"{_f(sp['inprocess']['unsplit_median'], '{:.1f}')} tok/s there) | "
             f"{_f(sp['inprocess']['split_median'], '{:.1f}')} | {_f(h['inprocess_over_single'])} | | |",
             f"| our three agents, loopback (data lanes) | {_f(sp['loopback_tokens_per_s'], '{:.1f}')} | "
             f"{_f(h['loopback_over_single'])} | {_f(sp['loopback_prefill_tokens_per_s'], '{:.0f}')} | >= 0.85 |",
             f"| the same, agents signing once per receipt window (--sign-per-window) | | "
             f"{_f(h.get('loopback_signing_per_window_over_single'))} | | |",
             f"| the same, the driver sampling from the logit row instead of the final stage | | "
             f"{_f(h.get('loopback_driver_sampling_over_single'))} | | |"]
    rpc = res.get("rpc")
    if rpc:
        lines += [f"| llama-bench single node | {_f(rpc['single']['generation']['tokens_per_s'], '{:.1f}')} | 1 "
                  f"(its own reference) | {_f(rpc['single']['prefill']['tokens_per_s'], '{:.0f}')} | |",
                  f"| llama.cpp RPC mode, three ggml-rpc-servers, loopback | "
                  f"{_f(rpc['loopback']['generation']['tokens_per_s'], '{:.1f}')} | {_f(h['rpc_over_single'])} | "
                  f"{_f(rpc['loopback']['prefill']['tokens_per_s'], '{:.0f}')} | ours ahead |"]
    else:
        lines.append(f"| llama.cpp RPC mode | skipped: {res['skipped'].get('rpc')} | | | |")
    if rpc:
        pl = rpc["loopback"].get("placement", {})
        lines += ["", f"llama.cpp placed the layers (its own log, tensor split {rpc['tensor_split']}; layer "
                  f"{res['model']['layers']} is the output layer): {pl.get('layers_by_device')}, {pl.get('offloaded')}."]
    lines += ["", _breakdown_text(h["loopback_breakdown_ms"])]
    dist = res.get("distance")
    if dist:
        lines += ["", f"Distance ({dist['label']}):", "",
                  "| round trip (emulated) | ours tok/s | ours / single | llama.cpp RPC tok/s | RPC / its single |",
                  "|---|---|---|---|---|"]
        for r in dist["rows"]:
            lines.append(f"| {r['rtt_ms']:g} ms | {_f(r['ours_tokens_per_s'], '{:.1f}')} | "
                         f"{_f(r['ours_over_single'])} | {_f(r.get('rpc_tokens_per_s'), '{:.1f}')} | "
                         f"{_f(r.get('rpc_over_single'))} |")
    else:
        lines += ["", f"Distance rows skipped: {res['skipped'].get('distance')}"]
    c = res["commit_sign"]
    lines += ["", "| our extras | measured | target |", "|---|---|---|",
              f"| commitments + receipt signatures, share of token time | {_pct(h['commit_share'])} "
              f"({c['commit_sign_ms_per_token']} of {c['forward_ms_per_token'] + c['commit_sign_ms_per_token']:.3f} "
              f"ms per token; per stage {c['per_stage_share']}) | < 2% |"]
    cw = res.get("commit_sign_per_window")
    if cw:
        lines.append(f"| the same, signing once per receipt window (--sign-per-window) | "
                     f"{_pct(cw['share_of_token_time'])} ({cw['commit_sign_ms_per_token']} ms per token; per stage "
                     f"{cw['per_stage_share']}) | < 2% |")
    for k, a in sp["audits"].items():
        p, _, replay = k.partition("_replay")
        p, state, state_window = p.removesuffix("_original").partition("_state")
        what = (f"audits at {p}%" + (f", decode steps replayed {replay} rows at a time" if replay else "")
                + (", decode steps replayed one row at a time (--audit-replay-rows 1)" if k.endswith("_original")
                   else "")
                + (f" of the state windows ({state_window or 'the default'} positions), each from the signed "
                   "states before it (--audit-from-state)" if state else ""))
        lines.append(f"| {what}: audit CPU / generation CPU | {_f(a['cpu_ratio'])} | "
                     f"{'<= 0.3' if p == '20' else ''} |")
        lines.append(f"| {what}: wall time added per token | {_pct(a['added_share'])} | |")
    fo = res["failover"]
    warm = "the backup loaded the stage ahead" if res['settings'].get('warm_backups', True) else \
        "the backup loading the stage then (--cold-backups)"
    lines += [f"| failover spike, stage 1 killed at token {res['settings']['failover_kill_at']} "
              f"({fo['spike_ms']['n']} runs, {warm}) | median {_f(fo['spike_ms']['median'], '{:.0f}')} ms, worst "
              f"{_f(fo['spike_ms']['max'], '{:.0f}')} ms | < 1000 ms |"]
    groups: dict[tuple, list[dict]] = {}   # the runs at one kill token one way, side by side in the table
    for g in fo["by_context"]:
        groups.setdefault((g["kill_at_token"], bool(g.get("exact_shapes"))), []).append(g)
    for (token, exact), gs in sorted(groups.items()):
        how = "in the original batch shapes" if exact else f"{gs[0].get('merged_rows', 0)} of them in merged batches"
        spikes = ", ".join(f"{g['spike_ms']:.0f}" for g in gs)
        lines.append(f"| failover at token {token} ({gs[0]['context_replayed']} rows replayed, {how}) | "
                     f"{spikes} ms | |")
    for adopt in (True, False):
        gs = [g for g in fo.get("with_audits", []) if g["adopt"] == adopt]
        if gs:
            how = (f"the backup taking over its audit replay ({', '.join(str(g['adopted_rows']) for g in gs)} rows)"
                   if adopt else "the backup replaying every row")
            spikes = ", ".join(f"{g['spike_ms']:.0f}" for g in gs)
            lines.append(f"| failover at token {gs[0]['kill_at_token']} with 20% audits ({gs[0]['context_replayed']} "
                         f"rows), {how} | {spikes} ms | |")
    for r in res["concurrent"]["rows"]:
        lines.append(f"| {r['sessions']} session(s) at once: aggregate tok/s | {r['aggregate_tokens_per_s']:.1f} "
                     f"({r['over_one_session']:.2f}x one session) | |")
    if res.get("memory"):
        lines += ["", "| stage | weights MiB | resident MiB | resident / weights |", "|---|---|---|---|"]
        for row in h["memory_per_stage"]:
            lines.append(f"| {row['layers']} | {row['weights_mib']} | {row['rss_mib']} | {row['rss_over_weights']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    h = res["headline"]
    names = ["our split\nin process", "our agents\nloopback"]
    vals = [h["inprocess_over_single"], h["loopback_over_single"]]
    colors = ["tab:blue", "tab:blue"]
    if h["rpc_over_single"] is not None:
        names.append("llama.cpp RPC\nloopback")
        vals.append(h["rpc_over_single"])
        colors.append("tab:orange")
    ax = axes[0]
    ax.bar(range(len(vals)), vals, color=colors)
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.axhline(0.85, color="red", linestyle="--", label="0.85 target (ours)")
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.set_ylabel("generation tokens/s over its single-node run")
    ax.set_title("same model, machine and split")
    ax.legend(fontsize=8)
    _plot_breakdown(axes[1], h["loopback_breakdown_ms"])
    ax = axes[2]
    dist = res.get("distance")
    if dist:
        rtts = [r["rtt_ms"] for r in dist["rows"]]
        ax.plot(rtts, [r["ours_over_single"] for r in dist["rows"]], marker="o", label="ours (three agents)")
        if any("rpc_over_single" in r for r in dist["rows"]):
            ax.plot(rtts, [r.get("rpc_over_single") for r in dist["rows"]], marker="s", label="llama.cpp RPC")
        ax.set_xscale("symlog", linthresh=1)
        ax.legend()
    ax.set_xlabel("added round trip, ms (emulated by a delaying proxy)")
    ax.set_ylabel("tokens/s over single node")
    ax.set_title("separate network namespaces")
    ax = axes[3]
    fo = res["failover"]
    every = fo["runs"] + fo["by_context"] + fo.get("with_audits", [])
    kinds = (("decode steps merged where checked", lambda r: not r.get("exact_shapes") and not r.get("audit_probability"), "o"),
             ("original batch shapes", lambda r: r.get("exact_shapes"), "x"),
             ("20% audits, taking over the audit replay", lambda r: r.get("audit_probability") and r.get("adopt"), "^"),
             ("20% audits, replaying every row", lambda r: r.get("audit_probability") and not r.get("adopt"), "v"))
    for label, kind, marker in kinds:
        runs = [(r["context_replayed"], r["spike_ms"]) for r in every if kind(r)]
        if runs:
            ax.scatter([x for x, _ in runs], [y for _, y in runs], label=label, marker=marker)
    ax.axhline(1000, color="red", linestyle="--", label="1 s target")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rows replayed on the backup (context)")
    ax.set_ylabel("failover spike, ms")
    ax.set_title("failover, stage 1 killed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_breakdown(ax, b: dict) -> None:
    """Stacked bars: a generated token's time on the single node, on our agents, and in RPC mode."""
    compute = ("compute: llama.cpp (agents: with their step handling)", "tab:blue")
    rest = ("sampling and the loop", "tab:gray")
    bars = [("single node", [(compute, b["single_compute_ms"]), (rest, b["single_ms"] - b["single_compute_ms"])]),
            ("our agents\nloopback", [(compute, b["agents_compute_ms"]), (("hops", "tab:red"), b["hops_ms"]),
                                      (rest, b["driver_ms"])])]
    if b["rpc_added_ms"] is not None:
        bars.append(("llama.cpp RPC: single node\n+ what RPC adds over\nllama-bench's single node",
                     [(("single node", "tab:cyan"), b["single_ms"]),
                      (("added by RPC mode", "tab:orange"), b["rpc_added_ms"])]))
    seen = set()
    for i, (_, parts) in enumerate(bars):
        bottom = 0.0
        for (label, color), ms in parts:
            ax.bar(i, ms, bottom=bottom, color=color, label=None if label in seen else label)
            seen.add(label)
            bottom += ms
    ax.axhline(b["single_ms"] / 0.85, color="red", linestyle="--", label="0.85 of single-node speed")
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize=8)
    ax.set_ylim(0, max(b["ours_ms"], b["single_ms"] + (b["rpc_added_ms"] or 0)) * 1.45)
    ax.set_ylabel("ms per generated token (median)")
    ax.set_title("where a token's time goes")
    ax.legend(fontsize=7, loc="upper left")


def write(res: dict, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "summary.md").write_text(summary(res) + "\n![anchors](anchors.png)\n")
    plot(res, out / "anchors.png")
