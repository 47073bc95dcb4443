"""Markdown report, PNG plots and JSON for one PMA experiment (benchmarks/pma/run.py).

Every sentence in the "Findings" section is computed from the numbers, so a re-run that comes out
differently says so.
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHOD_LABEL = {("sma", None): "SMA", ("wma", None): "WMA", ("ema", 0.1): "EMA a=0.1", ("ema", 0.2): "EMA a=0.2"}
COLORS = {"SMA": "tab:blue", "WMA": "tab:orange", "EMA a=0.1": "tab:green", "EMA a=0.2": "tab:red"}


def _label(rec):
    return METHOD_LABEL[(rec["method"], rec["alpha"])]


def _key(method, alpha, its):
    tag = method if alpha is None else f"{method}{alpha}"
    return f"{tag}:{','.join(map(str, its))}"


def _window(cfg, point, n, interval):
    its = [point - interval * (n - 1 - i) for i in range(n)]
    return its if its[0] >= cfg["ckpt_every"] else None


def _smooth(xs, k):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _latest(results, it):
    main = results["main"]
    return main["held_out"][main["ckpt"].index(it)]


def analyse(results):
    """Derived numbers: per fork point, latest / merged / annealed; ablation grid; PMA-init; spike."""
    cfg = results["config"]
    merges = results["merges"]
    tps = results["tokens_per_step"]
    points = []
    for p in cfg["fork_points"]:
        branch = results["branches"][f"decay@{p}"]
        grid = []
        for n in cfg["merge_ns"]:
            for v in cfg["merge_intervals"]:
                its = _window(cfg, p, n, v)
                if not its:
                    continue
                for m, a in [("sma", None), ("wma", None), ("ema", 0.1), ("ema", 0.2)]:
                    rec = merges[_key(m, a, its)]
                    grid.append(dict(method=METHOD_LABEL[(m, a)], n=n, interval=v, held_out=rec["held_out"],
                                     delta=rec["held_out"] - _latest(results, p)))
        best = min(grid, key=lambda g: g["held_out"])
        sma = next((g for g in grid if g["method"] == "SMA" and g["n"] == cfg["curve_n"]
                    and g["interval"] == cfg["curve_interval"]), None)
        latest = _latest(results, p)
        annealed = branch["held_out"][-1]
        points.append(dict(point=p, tokens=p * tps, latest=latest, annealed=annealed,
                           annealed_tokens=(p + cfg["decay_steps"]) * tps, best=best, sma=sma, grid=grid,
                           gap_closed=(latest - best["held_out"]) / (latest - annealed) if latest > annealed else None))
    init = {k.split("/")[1]: v for k, v in results["branches"].items() if k.startswith("pma_init/")}
    spike = {k.split("/")[1]: v for k, v in results["branches"].items() if k.startswith("spike/")}
    return dict(points=points, init_latest=init["latest"], init_merged=init["merged"], init=init, spike=spike,
                curve=[p for p in results["curve"]["points"] if len(p["iterations"]) == cfg["curve_n"]])


# the arms that resume from a merge carrying optimizer state (pmm_dist merge --optimizer latest|merge)
OPTIMIZER_ARMS = [("latest", "tab:purple", "--optimizer latest: newest AdamW state"),
                  ("merge", "tab:green", "--optimizer merge: AdamW moments merged")]


# ----------------------------------------------------------------------------- plots

def plot_loss_vs_tokens(results, a, path):
    cfg, tps = results["config"], results["tokens_per_step"]
    main = results["main"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([s * tps / 1e6 for s in main["ckpt"]], main["held_out"], "o-", ms=3, color="tab:gray",
            label="latest checkpoint (constant LR)")
    curve = results["curve"]["points"]
    ax.plot([r["iteration"] * tps / 1e6 for r in curve], [r["held_out"] for r in curve], "s-", ms=3,
            color="tab:blue", label=f"SMA merged (last N={cfg['curve_n']}, V={cfg['curve_interval']} steps; "
                                    f"pmm-dist watch --backfill)")
    for i, p in enumerate(cfg["fork_points"]):
        b = results["branches"][f"decay@{p}"]
        ax.plot([s * tps / 1e6 for s in b["eval_step"]], b["held_out"], "^-", ms=4, color="tab:red",
                label="annealed (decay branch)" if i == 0 else None)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out loss (nats / byte)")
    lo = min(min(main["held_out"]), min(r["held_out"] for r in curve))
    ax.set_ylim(lo - 0.05, main["held_out"][min(3, len(main["held_out"]) - 1)] + 0.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Held-out loss: latest vs merged vs annealed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(results, a, path):
    cfg = results["config"]
    pts = a["points"]
    fig, axes = plt.subplots(1, len(pts), figsize=(4.2 * len(pts), 4), sharey=True, squeeze=False)
    for ax, pt in zip(axes[0], pts):
        for method, color in COLORS.items():
            for v, style in zip(cfg["merge_intervals"], ["-", "--", ":"]):
                rows = [g for g in pt["grid"] if g["method"] == method and g["interval"] == v]
                if rows:
                    ax.plot([g["n"] for g in rows], [g["delta"] for g in rows], style, marker="o", ms=4,
                            color=color, label=f"{method}, V={v}")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(pt["annealed"] - pt["latest"], color="tab:gray", ls="-.", lw=1, label="annealed")
        ax.set_title(f"merge at step {pt['point']}")
        ax.set_xlabel("N (checkpoints merged)")
        ax.set_xticks(list(cfg["merge_ns"]))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss - latest checkpoint's (nats)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pma_init(results, a, path):
    main = results["main"]
    lat, mer = a["init_latest"], a["init_merged"]
    start = lat["start"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ref = [(s, h) for s, h in zip(main["ckpt"], main["held_out"]) if s >= start]
    if len(ref) > 1:
        ax1.plot(*zip(*ref), "o-", ms=3, color="tab:gray", label="main run (its optimizer state)")
    ax1.plot(lat["eval_step"], lat["held_out"], "o-", ms=3, color="tab:orange", label="init: latest checkpoint")
    ax1.plot(mer["eval_step"], mer["held_out"], "o-", ms=3, color="tab:blue", label="init: SMA merged, fresh AdamW")
    for policy, color, label in OPTIMIZER_ARMS:
        b = a["init"][f"merged_optimizer_{policy}"]
        ax1.plot(b["eval_step"], b["held_out"], "o-", ms=3, color=color, label=f"init: SMA merged, {label}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out loss")
    ax1.set_title("Continued training from step %d" % start)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    k = 10
    ax2.plot(lat["step"], _smooth(lat["grad_norm"], k), color="tab:orange", label="init: latest")
    ax2.plot(mer["step"], _smooth(mer["grad_norm"], k), color="tab:blue", label="init: SMA merged")
    for policy, color, _ in OPTIMIZER_ARMS:
        b = a["init"][f"merged_optimizer_{policy}"]
        ax2.plot(b["step"], _smooth(b["grad_norm"], k), color=color, label=f"init: SMA merged, --optimizer {policy}")
    ms = [(s, g) for s, g in zip(main["step"], main["grad_norm"]) if s > start]
    if ms:
        ax2.plot([s for s, _ in ms], _smooth([g for _, g in ms], k), color="tab:gray", label="main run")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"gradient norm (running mean of {k}, before clipping)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spike(results, a, path):
    main = results["main"]
    sp = a["spike"]
    start = sp["spiked"]["start"]
    end = max(b["step"][-1] for b in sp.values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    k = 10
    ms = [(s, l) for s, l in zip(main["step"], main["train_loss"]) if start - 100 < s <= end]
    ax1.plot([s for s, _ in ms], _smooth([l for _, l in ms], k), color="tab:gray", label="main run (no spike)")
    arms = [("spiked", "tab:red", "LR spike, run continues"),
            ("resume_latest", "tab:orange", "resume: last pre-spike checkpoint"),
            ("resume_sma3", "tab:blue", "resume: SMA of last 3 pre-spike")]
    arms += [(f"resume_sma3_optimizer_{policy}", color, f"resume: SMA of 3, {label}")
             for policy, color, label in OPTIMIZER_ARMS]
    for name, color, label in arms:
        b = sp[name]
        ax1.plot(b["step"], _smooth(b["train_loss"], k), color=color, label=label)
        ax2.plot(b["eval_step"], b["held_out"], "o-", ms=3, color=color, label=label)
    ref = [(s, h) for s, h in zip(main["ckpt"], main["held_out"]) if start <= s <= end]
    if ref:
        ax2.plot(*zip(*ref), "o-", ms=3, color="tab:gray", label="main run (no spike)")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (running mean of {k})")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown

def _f(x, d=4):
    return "n/a" if x is None else f"{x:.{d}f}"


def _std(xs):
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def findings(results, a):
    cfg = results["config"]
    out = []
    pts = a["points"]
    wins = [p for p in pts if p["best"]["held_out"] < p["latest"]]
    sma_wins = [p for p in pts if p["sma"] and p["sma"]["held_out"] < p["latest"]]
    out.append(f"- **Merged vs latest (stable phase).** The best merge beats the latest checkpoint at "
               f"{len(wins)} of {len(pts)} points; SMA N={cfg['curve_n']}, V={cfg['curve_interval']} at "
               f"{len(sma_wins)} of {len(pts)} (merged minus latest: " + ", ".join(
                   f"{p['sma']['held_out'] - p['latest']:+.3f}" for p in pts if p["sma"]) +
               " nats at steps " + ", ".join(str(p["point"]) for p in pts if p["sma"]) + "). "
               + ("Reproduces the paper's main finding." if len(sma_wins) == len(pts) else
                  "Only partly reproduces the paper's main finding."))
    curve = a["curve"]
    beat = sum(1 for r in curve if r["held_out"] < _latest(results, r["iteration"]))
    out.append(watch_finding(results))
    out.append(f"- **Along the run**, the SMA curve (every checkpoint with a full window of {cfg['curve_n']}) is "
               f"below the latest checkpoint at {beat} of {len(curve)} points.")
    closer = [p for p in pts if p["gap_closed"] is not None]
    out.append("- **Merging vs annealing.** The decay branch (" + str(cfg["decay_steps"]) + " more steps, LR to 0) "
               "reaches " + ", ".join(f"{p['annealed']:.3f}" for p in pts) + " vs the best merge's " +
               ", ".join(f"{p['best']['held_out']:.3f}" for p in pts) + "; merging recovers " +
               ", ".join(f"{100 * p['gap_closed']:.0f}%" for p in closer) +
               " of the latest-to-annealed gap. " +
               ("The merge matches or beats annealing here." if all(p["best"]["held_out"] <= p["annealed"] for p in pts)
                else "Annealing stays ahead: the merged model approximates, but does not reach, the annealed one "
                     "at this scale (the paper reports the merged constant-LR model close to, or better than, "
                     "the annealed one)."))
    # ablation: method ranking early vs late
    first, last = pts[0], pts[-1]

    def rank(pt, n, v):
        rows = sorted((g for g in pt["grid"] if g["n"] == n and g["interval"] == v), key=lambda g: g["held_out"])
        return [g["method"] for g in rows], rows

    n_big, v_small = max(cfg["merge_ns"]), min(cfg["merge_intervals"])
    for pt, when in [(first, "early"), (last, "late")]:
        order, rows = rank(pt, n_big, v_small)
        if rows:
            spread = rows[-1]["held_out"] - rows[0]["held_out"]
            out.append(f"- **Methods {when} (step {pt['point']}, N={n_big}, V={v_small}):** "
                       + " < ".join(order) + f" (spread {spread:.4f} nats).")
    e1 = [g for g in first["grid"] if g["method"] == "EMA a=0.1"]
    e2 = {(g["n"], g["interval"]): g for g in first["grid"] if g["method"] == "EMA a=0.2"}
    ema_better = sum(1 for g in e1 if e2[(g["n"], g["interval"])]["held_out"] < g["held_out"])
    wma_best = sum(1 for n in cfg["merge_ns"] for v in cfg["merge_intervals"]
                   if rank(first, n, v)[1] and rank(first, n, v)[0][0] == "WMA")
    cells = sum(1 for n in cfg["merge_ns"] for v in cfg["merge_intervals"] if rank(first, n, v)[1])
    out.append(f"- **Paper: early in training WMA is best and EMA 0.2 beats EMA 0.1.** At step {first['point']} WMA is "
               f"best in {wma_best} of {cells} (N, V) cells, EMA 0.2 beats EMA 0.1 in {ema_better} of {len(e1)}.")
    n_max = max(cfg["merge_ns"])
    out.append(f"  With the paper's recursion (E_1 = M_1), EMA gives the OLDEST checkpoint weight (1-a)^(N-1): "
               f"{0.9 ** (n_max - 1):.2f} at a=0.1, {0.8 ** (n_max - 1):.2f} at a=0.2 for N={n_max} (SMA: "
               f"{1 / n_max:.2f}, WMA: {2 / (n_max * (n_max + 1)):.3f}); while the loss still falls, the more weight "
               f"on old checkpoints, the worse the merge.")
    spread_first = max(g["held_out"] for g in first["grid"]) - min(g["held_out"] for g in first["grid"])
    spread_last = max(g["held_out"] for g in last["grid"]) - min(g["held_out"] for g in last["grid"])
    out.append(f"- **Paper: late in training the methods converge.** Spread over all merges: {spread_first:.4f} nats "
               f"at step {first['point']}, {spread_last:.4f} at step {last['point']}.")
    big_v = max(cfg["merge_intervals"])
    early_big = [g for g in first["grid"] if g["interval"] == big_v and g["n"] == n_big and g["method"] == "SMA"]
    if early_big:
        g = early_big[0]
        out.append(f"- **Paper: merging too much history early hurts.** At step {first['point']}, SMA of N={n_big} "
                   f"with V={big_v} (back to step {first['point'] - big_v * (n_big - 1)}) is {g['delta']:+.4f} nats "
                   f"vs the latest checkpoint; with V={v_small}: "
                   f"{next(x['delta'] for x in first['grid'] if x['interval'] == v_small and x['n'] == n_big and x['method'] == 'SMA'):+.4f}.")
    lat, mer = a["init_latest"], a["init_merged"]
    w = min(100, len(lat["grad_norm"]))
    out.append(f"- **PMA-init** (step {lat['start']}, fresh AdamW, {cfg['rewarmup_steps']}-step re-warmup): held-out "
               f"{mer['held_out'][0]:.4f} (merged) vs {lat['held_out'][0]:.4f} (latest) at the start, "
               f"{mer['held_out'][-1]:.4f} vs {lat['held_out'][-1]:.4f} after {len(lat['step'])} steps; "
               f"gradient-norm std over the first {w} steps {_std(mer['grad_norm'][:w]):.3f} (merged) vs "
               f"{_std(lat['grad_norm'][:w]):.3f} (latest). "
               + ("The merged start keeps its lead: reproduces the paper's PMA-init benefit." if mer["held_out"][-1] < lat["held_out"][-1] else
                  f"The merged start's lead is gone at the first evaluation ({mer['eval_step'][1]}: "
                  f"{mer['held_out'][1]:.4f} vs {lat['held_out'][1]:.4f}) and it stays behind: at this scale, "
                  "with the LR back at its peak, PMA-init does not reproduce the paper's benefit for continued "
                  "training (a likely cause: the LR returns to its constant-phase peak, which brings back the noise that merging "
                  "averaged out; a PMA-init with a decaying LR was not tried)."))
    out.append(optimizer_finding(results, a))
    sp = a["spike"]
    peak = max(sp["spiked"]["train_loss"][:cfg["spike_steps"] + 20])
    out.append(f"- **Loss spike** (LR x{cfg['spike_factor']:g} for {cfg['spike_steps']} steps after step "
               f"{cfg['spike_point']}): training loss peaks at {peak:.2f}; {len(sp['spiked']['step'])} steps later the "
               f"spiked run's held-out loss is {sp['spiked']['held_out'][-1]:.4f} vs the main run's "
               f"{_main_at(results, sp['spiked']['step'][-1])}. Resuming from the SMA of the last 3 pre-spike "
               f"checkpoints: {sp['resume_sma3']['held_out'][-1]:.4f}; from the last pre-spike checkpoint: "
               f"{sp['resume_latest']['held_out'][-1]:.4f} (both fresh AdamW, same data). "
               + ("Both resumes recover the run, which the spiked run does not do on its own; "
                  if max(sp['resume_sma3']['held_out'][-1], sp['resume_latest']['held_out'][-1]) < sp['spiked']['held_out'][-1] - 0.05
                  else "")
               + ("resuming from the SMA ends lower: reproduces the paper." if sp['resume_sma3']['held_out'][-1] < sp['resume_latest']['held_out'][-1]
                  else "the SMA start gives no advantage over the last pre-spike checkpoint here (the provoked spike's "
                       "cause is gone after the resume, so the last pre-spike checkpoint is a healthy start; the "
                       "paper's spike was intrinsic to the run)."))
    return out


def optimizer_finding(results, a):
    """What resuming with the merge's optimizer state (``--optimizer latest|merge``) changes, against
    the fresh-AdamW merged start and the run that kept its own optimizer."""
    cfg = results["config"]
    parts = []
    for where, arms, fresh_key in [("PMA-init", a["init"], "merged"), ("spike recovery", a["spike"], "resume_sma3")]:
        fresh = arms[fresh_key]
        end = fresh["eval_step"][-1]
        cells = [f"fresh AdamW {fresh['held_out'][-1]:.4f}"]
        for policy, _, _ in OPTIMIZER_ARMS:
            b = arms[f"{fresh_key}_optimizer_{policy}"]
            cells.append(f"`--optimizer {policy}` {b['held_out'][-1]:.4f} (first evaluation {b['held_out'][1]:.4f})")
        parts.append(f"{where} at step {end}: " + ", ".join(cells) + f", main run {_main_at(results, end)}")
    init = a["init"]
    lead = {p: init[f"merged_optimizer_{p}"]["held_out"][-1] - init["merged"]["held_out"][-1] for p in ("latest", "merge")}
    main_end = results["main"]["ckpt"]
    kept_end = init["merged"]["eval_step"][-1]
    verdict = ""
    if kept_end in main_end:
        main_h = results["main"]["held_out"][main_end.index(kept_end)]
        better = [p for p in ("latest", "merge") if init[f"merged_optimizer_{p}"]["held_out"][-1] < main_h]
        verdict = (" With the optimizer state kept, PMA-init ends below the main run with " + " and ".join(
            f"`{p}`" for p in better) + ": the merged start's lead survives once AdamW is not restarted."
                   if better else
                   " Neither ends below the main run (the run that never merged): keeping the optimizer state "
                   "does not make PMA-init pay off at this scale either, with the LR at its constant-phase peak.")
    spike = a["spike"]
    spike_lead = {p: spike[f"resume_sma3_optimizer_{p}"]["held_out"][-1] - spike["resume_sma3"]["held_out"][-1]
                  for p in ("latest", "merge")}
    largest = max(abs(d) for d in [*lead.values(), *spike_lead.values()])
    return ("- **Optimizer state in the merge** (AdamW loaded from the merge, constant LR "
            f"{cfg['peak_lr']:g}, no re-warmup): " + "; ".join(parts) + ". Against the fresh-AdamW merged start, "
            + ", ".join(f"`{p}` {d:+.4f}" for p, d in lead.items()) + " nats at the end of PMA-init, "
            + ", ".join(f"`{p}` {d:+.4f}" for p, d in spike_lead.items()) + " at the end of the spike recovery"
            + (f" (at most {largest:.3f} nats: the noise level of one seed at this scale)" if largest < 0.01 else "")
            + "." + (" Kept moments spare the re-warmup, but each arm with them is above the main run at its first "
                     "evaluation: at the peak LR the merged start's lead is gone within one evaluation interval."
                     if all(_behind_main_at_first_evaluation(results, arms[f"{fresh}_optimizer_{p}"])
                            for arms, fresh in ((init, "merged"), (spike, "resume_sma3")) for p in ("latest", "merge"))
                     else "") + verdict)


def _behind_main_at_first_evaluation(results, branch) -> bool:
    main = results["main"]
    step = branch["eval_step"][1]
    return step in main["ckpt"] and branch["held_out"][1] > main["held_out"][main["ckpt"].index(step)]


def watch_finding(results):
    c = results["curve"]
    return (f"- **`pmm-dist watch --backfill`** published the merged curve ({c['published']} merges, one per "
            f"checkpoint) in {c['watch_seconds']:.1f} s reading {c['watch_bytes_read'] / 1e6:.0f} MB; the same windows "
            f"merged by one `pmm-dist merge` each took {c['merge_seconds']:.1f} s reading "
            f"{c['merge_bytes_read'] / 1e6:.0f} MB ({c['merge_seconds'] / c['watch_seconds']:.1f}x the time, "
            f"{c['merge_bytes_read'] / max(1, c['watch_bytes_read']):.1f}x the bytes); "
            + accuracy_sentence(c))


def accuracy_sentence(c):
    pts = c["points"]
    worst = {name: max(p[f"{name}_max_ulps"] for p in pts) for name in ("watch", "merge")}
    off = {name: max(p[f"{name}_not_nearest"] for p in pts) for name in ("watch", "merge")}
    apart = max(p["elements_apart"] for p in pts)
    if apart == 0:
        return ("every published merge is equal, tensor by tensor, to its `merge` counterpart, and "
                + ("every element is the nearest value of the float64 SMA of its window." if off["watch"] == 0 else
                   f"within {worst['watch']:.3f} ulp of the float64 SMA of its window."))
    return (f"against the float64 SMA of each window, the watcher's merges are within {worst['watch']:.3f} ulp "
            f"({100 * off['watch']:.2f}% of elements not the nearest value) and `merge`'s within "
            f"{worst['merge']:.3f} ulp ({100 * off['merge']:.2f}%); they differ from each other in at most "
            f"{100 * apart:.2f}% of a merge's elements — both within the "
            "one-ulp tolerance of the issue, not byte-identical.")


def _main_at(results, step):
    main = results["main"]
    return f"{main['held_out'][main['ckpt'].index(step)]:.4f}" if step in main["ckpt"] else "n/a (beyond the main run)"


def markdown(results, a, pngs):
    cfg = results["config"]
    t = results["timings"]
    m = cfg["model"]
    tps = results["tokens_per_step"]
    L = []
    L.append(f"# PMA at toy scale: merging the checkpoints of a small GPT pre-trained with WSD ({results['date']})\n")
    L.append("Reproduces the experiments of *Model Merging in Pre-training of Large Language Models* "
             "(arXiv 2505.12082) on a megatron-core GPTModel trained on CPU, merged with `pmm_dist`.\n")
    L.append("```bash\n" + results["command"] + f"    # seed {cfg['seed']} (fixed in the config)\n```\n")
    L.append(f"Wall time {t['total_s'] / 60:.1f} min on {results['machine']['cores']} cores "
             f"({results['machine']['cpu']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in results['machine']['load_average_at_end'])} — the machine was shared): "
             f"main run {t['main_run_s']:.0f} s, branches and merges {t['branches_and_merges_s']:.0f} s, merged curve "
             f"{t['curve_s']:.0f} s "
             f"({t['merge_cli_calls']} `pmm_dist merge` CLI calls, {t['merge_cli_mean_s']:.1f} s each on average, "
             f"two at a time, beside {cfg['num_workers']} training workers).\n")
    L.append("## Set-up\n")
    L.append(f"- Model: megatron-core `GPTModel`, {m['num_layers']} layers, hidden {m['hidden_size']}, "
             f"{m['num_attention_heads']} heads, FFN {m['ffn_hidden_size']}, RoPE, untied embeddings, byte vocabulary 256, "
             f"fp32, {results['num_params'] / 1e6:.2f} M parameters; TP=1 on a one-process gloo group, CPU.")
    L.append(f"- Data: the Python standard library's own `.py` files, byte-level; a file is held out when "
             f"crc32(relative path) % 10 == 0. Train {results['corpus']['train_bytes'] / 1e6:.1f} MB, held-out "
             f"{results['corpus']['held_out_bytes'] / 1e6:.1f} MB; held-out loss = mean next-byte cross-entropy (nats) "
             f"over {cfg['eval_windows']} fixed windows ({results['corpus']['held_out_tokens_evaluated']} predicted bytes).")
    L.append(f"- Training: AdamW (betas 0.9/0.95, weight decay 0.1, grad clip 1.0), batch {m['micro_batch_size']} x "
             f"{m['seq_length']} = {tps} tokens/step. WSD: {cfg['warmup_steps']} warmup steps to LR {cfg['peak_lr']:g}, "
             f"constant to step {cfg['total_steps']} ({cfg['total_steps'] * tps / 1e6:.2f} M tokens); decay branches "
             f"forked at steps {', '.join(map(str, cfg['fork_points']))} decay linearly to 0 over {cfg['decay_steps']} "
             f"steps (with the main run's optimizer state and data order).")
    L.append(f"- Checkpoints: every {cfg['ckpt_every']} steps in Megatron-LM's legacy layout "
             f"(`iter_XXXXXXX/mp_rank_00/model_optim_rng.pt` with args, checkpoint_version 3.0, iteration, model, "
             f"optimizer, opt_param_scheduler, rng_state; tracker written last).")
    L.append(f"- Merging: only through `python -m pmm_dist merge RUN --out OUT --method M [--alpha A] --iterations ... "
             f"--optimizer drop|latest|merge --quiet --device cpu`, and the curve along the run through one "
             f"`python -m pmm_dist {results['curve']['command']}`; each result loaded into a fresh GPTModel with "
             f"`load_state_dict(strict=True)`. \"Merge at step T with N, V\" = the checkpoints T-(N-1)V, ..., T-V, T.\n")
    L.append("## Findings\n")
    L += findings(results, a)
    L.append("")
    L.append(f"## Merged vs latest vs annealed\n\n![loss vs tokens]({pngs['tokens']})\n")
    L.append("| step | tokens (M) | latest | SMA N=%d V=%d | best merge | best is | annealed (+%d steps) | gap closed |"
             % (cfg["curve_n"], cfg["curve_interval"], cfg["decay_steps"]))
    L.append("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for p in a["points"]:
        b = p["best"]
        gap = "n/a" if p["gap_closed"] is None else f"{100 * p['gap_closed']:.0f}%"
        L.append(f"| {p['point']} | {p['tokens'] / 1e6:.2f} | {p['latest']:.4f} | "
                 f"{_f(p['sma']['held_out'] if p['sma'] else None)} | {b['held_out']:.4f} | "
                 f"{b['method']} N={b['n']} V={b['interval']} | {p['annealed']:.4f} | {gap} |")
    L.append("\n\"gap closed\" = (latest - best merge) / (latest - annealed).\n")
    L.append(f"## Ablation: method, N, interval\n\n![ablation]({pngs['ablation']})\n")
    L.append("Held-out loss of the merged model minus the latest checkpoint's (nats; negative = merging helps).\n")
    header = "| step | N | V | " + " | ".join(COLORS) + " |"
    L.append(header)
    L.append("| ---: | ---: | ---: |" + " ---: |" * len(COLORS))
    for p in a["points"]:
        cells = {}
        for g in p["grid"]:
            cells.setdefault((g["n"], g["interval"]), {})[g["method"]] = g["delta"]
        for (n, v), row in sorted(cells.items()):
            best = min(row.values())
            L.append(f"| {p['point']} | {n} | {v} | " + " | ".join(
                (f"**{row[mm]:+.4f}**" if row[mm] == best else f"{row[mm]:+.4f}") for mm in COLORS) + " |")
    lat, mer = a["init_latest"], a["init_merged"]
    L.append(f"\n## PMA-init\n\nAt step {lat['start']}: continue training from the latest checkpoint or from the "
             f"SMA of its last {cfg['pma_init_n']} checkpoints (V={cfg['ckpt_every']}), both with a fresh AdamW, "
             f"{cfg['rewarmup_steps']}-step LR re-warmup to {cfg['peak_lr']:g}, then constant; and from the same "
             f"SMA merged with `--optimizer latest` (the newest checkpoint's AdamW moments and step) or "
             f"`--optimizer merge` (the AdamW moments SMA-merged too), AdamW loaded from the merge, constant LR "
             f"with no re-warmup. The model is fp32, so there are no separate master weights: the merged model "
             f"tensors are the weights under every policy. The main run (which keeps its optimizer state) for "
             f"reference.\n\n![PMA-init]({pngs['pma_init']})\n")
    L.append("| step | main run | init: latest | init: SMA merged | SMA + `--optimizer latest` | SMA + `--optimizer merge` |")
    L.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
    opt_l, opt_m = (a["init"][f"merged_optimizer_{p}"]["held_out"] for p in ("latest", "merge"))
    for s, hl, hm, ol, om in zip(lat["eval_step"], lat["held_out"], mer["held_out"], opt_l, opt_m):
        L.append(f"| {s} | {_main_at(results, s)} | {hl:.4f} | {hm:.4f} | {ol:.4f} | {om:.4f} |")
    sp = a["spike"]
    L.append(f"\n## Loss-spike recovery\n\nFrom step {cfg['spike_point']} (with the run's optimizer state): LR x"
             f"{cfg['spike_factor']:g} for {cfg['spike_steps']} steps, then back to {cfg['peak_lr']:g}. Then, instead, "
             f"resume at step {cfg['spike_point']} from the last pre-spike checkpoint or from the SMA of the last 3 "
             f"pre-spike checkpoints ({', '.join(map(str, results['merges'][results['spike_merge']]['iterations']))}), "
             f"fresh AdamW and {cfg['rewarmup_steps']}-step re-warmup for both, same data order; and from the SMA "
             f"merged with `--optimizer latest` / `--optimizer merge`, AdamW loaded from it, constant LR.\n\n"
             f"![spike]({pngs['spike']})\n")
    L.append("| step | main run (no spike) | spiked run | resume: latest pre-spike | resume: SMA of 3 pre-spike "
             "| SMA of 3 + `--optimizer latest` | SMA of 3 + `--optimizer merge` |")
    L.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rl, rs, spk = sp["resume_latest"], sp["resume_sma3"], sp["spiked"]
    spk_at = dict(zip(spk["eval_step"], spk["held_out"]))
    opt_l, opt_m = (sp[f"resume_sma3_optimizer_{p}"]["held_out"] for p in ("latest", "merge"))
    for s, hl, hs, ol, om in zip(rl["eval_step"], rl["held_out"], rs["held_out"], opt_l, opt_m):
        L.append(f"| {s} | {_main_at(results, s)} | {_f(spk_at.get(s))} | {hl:.4f} | {hs:.4f} | {ol:.4f} | {om:.4f} |")
    c = results["curve"]
    L.append(f"\n## The merged curve from `pmm-dist watch --backfill`\n\n`python -m pmm_dist {c['command']}` on the "
             f"finished run publishes the SMA of the last {cfg['curve_n']} checkpoints (all of them while there are "
             f"fewer) at every one of its {c['published']} checkpoints, each update reading the new checkpoint, the "
             f"one leaving the window and the running state. The baseline merges the same windows with one "
             f"`pmm-dist merge --iterations ...` each, one after another, once the experiment's training workers are done "
             f"(both timed as whole processes, import included; see the load average above).\n")
    L.append("| | merges | wall time (s) | per merge (s) | bytes read (MB) |")
    L.append("| --- | ---: | ---: | ---: | ---: |")
    for name, sec, nbytes in [("one `watch --backfill --once`", c["watch_seconds"], c["watch_bytes_read"]),
                              ("one `merge` per point", c["merge_seconds"], c["merge_bytes_read"])]:
        L.append(f"| {name} | {c['published']} | {sec:.1f} | {sec / c['published']:.2f} | {nbytes / 1e6:.0f} |")
    L.append("")
    L.append(watch_finding(results)[2:])
    L.append("\n## Limits of this reproduction\n")
    L.append(f"- Scale: {results['num_params'] / 1e6:.2f} M parameters, {cfg['total_steps'] * tps / 1e6:.1f} M tokens, "
             "one seed, held-out loss only (the paper: 0.4B-200B parameter models, trillions of tokens, downstream "
             "benchmarks). Differences below about 0.005 nats are within the noise of one seed.")
    L.append("- The loss spike is provoked (an LR spike) rather than arising on its own, so resuming removes its cause.")
    L.append("- The model trains in fp32, so `--optimizer latest` and `merge` differ from `drop` only in the AdamW state "
             "they carry; the masters-as-weights part of `--optimizer` (bf16 models with fp32 masters) is proven in the "
             "test suite on real DeepSpeed and megatron-core state, not measured here.")
    L.append("- Raw numbers: the JSON next to this file (per-step training loss, gradient norms, every merge's "
             "iterations, held-out loss and CLI time).")
    return "\n".join(L) + "\n"


def write(results, results_dir):
    os.makedirs(results_dir, exist_ok=True)
    stem = f"{results['date']}-{results['config']['name']}"
    a = analyse(results)
    pngs = {k: f"{stem}-{k.replace('_', '-')}.png" for k in ("tokens", "ablation", "pma_init", "spike")}
    plot_loss_vs_tokens(results, a, os.path.join(results_dir, pngs["tokens"]))
    plot_ablation(results, a, os.path.join(results_dir, pngs["ablation"]))
    plot_pma_init(results, a, os.path.join(results_dir, pngs["pma_init"]))
    plot_spike(results, a, os.path.join(results_dir, pngs["spike"]))
    md = os.path.join(results_dir, stem + ".md")
    with open(md, "w") as f:
        f.write(markdown(results, a, pngs))
    js = os.path.join(results_dir, stem + ".json")
    with open(js, "w") as f:
        json.dump(results, f, indent=1)
    return [md, js] + [os.path.join(results_dir, p) for p in pngs.values()]


if __name__ == "__main__":
    import sys
    with open(sys.argv[1]) as f:
        print("\n".join(write(json.load(f), sys.argv[2])))
