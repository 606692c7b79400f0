# ruff: noqa: E501, RUF001, RUF002  (Markdown text: long lines, en dashes and multiplication signs are intended)
"""Turn a results JSON into the target table, the drain chart and ``docs/benchmarks.md``.

``python -m bench.report bench/results/X.json`` regenerates the doc from a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO

DOC = REPO / "docs" / "benchmarks.md"
CHART = REPO / "docs" / "benchmarks-drain.png"
ANALYSIS = REPO / "bench" / "analysis.md"


def med(node: Any, key: str | None = None) -> float | None:
    """Median of a summary (or of ``node[key]``), None when missing."""
    if node is None:
        return None
    if key is not None:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and "median" in node:
        return node["median"]
    return None


def _target(
    name: str, want: str, ratio: float | None, ok: bool | None, detail: str
) -> dict[str, Any]:
    return {"target": name, "wanted": want, "measured": ratio, "pass": ok, "detail": detail}


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 5 with the measured ratio from this run (None when not measured)."""
    t: list[dict[str, Any]] = []
    drain = r.get("drain", {})
    single = {
        k: med(v, "jobs_per_s")
        for k, v in drain.items()
        if k.startswith("pgqueue_c") and isinstance(v, dict)
    }
    single = {k: v for k, v in single.items() if v is not None}
    if single:
        best_key = max(single, key=lambda k: single[k])
        best = single[best_key]
        peers = {k: med(v, "jobs_per_s") for k, v in drain.items() if k.startswith("pgqueuer_")}
        peers = {k: v for k, v in peers.items() if v}
        if peers:
            pk = max(peers, key=lambda k: peers[k])
            ratio = best / peers[pk]
            t.append(
                _target(
                    "drain: one worker vs PGQueuer's best",
                    ">= 1.75x",
                    ratio,
                    ratio >= 1.75,
                    f"pgqueue {best_key} {best:,.0f}/s vs PGQueuer {pk} {peers[pk]:,.0f}/s",
                )
            )
        ceiling = med(drain.get("raw_k100_c10"), "jobs_per_s")
        if ceiling:
            ratio = best / ceiling
            t.append(
                _target(
                    "drain: one worker vs raw k=100 ceiling",
                    ">= 0.40",
                    ratio,
                    ratio >= 0.40,
                    f"pgqueue {best_key} {best:,.0f}/s vs raw {ceiling:,.0f}/s",
                )
            )
        # Measured like the peers, which log nothing per job; the default's figure is shown too.
        cpu_key = "pgqueue_c200_quiet" if "pgqueue_c200_quiet" in drain else best_key
        cpu = med(drain[cpu_key], "worker_cpu_ms_per_1k")
        if cpu is not None:
            default_cpu = med(drain.get("pgqueue_c200"), "worker_cpu_ms_per_1k")
            with_lines = (
                f"; {default_cpu:.1f} ms with the default INFO line per job (pgqueue_c200)"
                if default_cpu is not None and cpu_key != "pgqueue_c200"
                else ""
            )
            t.append(
                _target(
                    "drain: worker CPU per 1,000 jobs",
                    "<= 20 ms",
                    cpu,
                    cpu <= 20,
                    f"at {cpu_key}{with_lines}; PostgreSQL"
                    f" {med(drain[cpu_key], 'pg_cpu_ms_per_1k'):,.0f} ms",
                )
            )
    lat = r.get("latency", {})
    if "pgqueue" in lat and "raw" in lat:
        p50, raw50 = med(lat["pgqueue"], "p50"), med(lat["raw"], "p50")
        ratio = p50 / raw50 if raw50 and raw50 > 0 else None
        t.append(
            _target(
                "latency: p50 vs raw LISTEN-and-claim",
                "<= 1.5x",
                ratio,
                None if ratio is None else ratio <= 1.5,
                f"pgqueue {p50:.2f} ms vs raw {raw50:.2f} ms"
                + (
                    f" ({p50 / med(lat['raw_process'], 'p50'):.2f}x the raw consumer in its own"
                    f" process, {med(lat['raw_process'], 'p50'):.2f} ms)"
                    if "raw_process" in lat
                    else ""
                ),
            )
        )
        if "pgqueuer" in lat:
            q50 = med(lat["pgqueuer"], "p50")
            t.append(
                _target(
                    "latency: p50 better than PGQueuer",
                    "< 1.0x",
                    p50 / q50,
                    p50 < q50,
                    f"pgqueue {p50:.2f} ms vs PGQueuer {q50:.2f} ms",
                )
            )
        p99 = med(lat["pgqueue"], "p99")
        t.append(_target("latency: p99", "<= 3 ms", p99, p99 <= 3.0, f"p99 {p99:.2f} ms"))
    enq = r.get("enqueue", {})
    if enq:
        for n in (1, 8):
            for key, mode in (("pgqueue", "always"), ("pgqueue_ww", "when_waiting")):
                a, b = med(enq.get(f"{key}_single_{n}")), med(enq.get(f"raw_single_{n}"))
                if a and b:
                    t.append(
                        _target(
                            f"enqueue: single call, {n} connection(s), vs raw INSERT"
                            f" (notify = {mode})",
                            ">= 0.90",
                            a / b,
                            a / b >= 0.9,
                            f"pgqueue {a:,.0f}/s vs raw {b:,.0f}/s",
                        )
                    )
        many, unnest = med(enq.get("pgqueue_many")), med(enq.get("raw_unnest"))
        if many and unnest:
            t.append(
                _target(
                    "enqueue: enqueue_many vs raw unnest",
                    ">= 0.50",
                    many / unnest,
                    many / unnest >= 0.5,
                    f"pgqueue {many:,.0f}/s vs raw {unnest:,.0f}/s",
                )
            )
        q = med(enq.get("pgqueuer_bulk"))
        if many and q:
            t.append(
                _target(
                    "enqueue: enqueue_many vs PGQueuer batch enqueue",
                    ">= 1.5x",
                    many / q,
                    many / q >= 1.5,
                    f"pgqueue {many:,.0f}/s vs PGQueuer {q:,.0f}/s",
                )
            )
    growth = r.get("growth", {})
    sizes = [k for k in growth if k.isdigit()]
    if "0" in growth and len(sizes) > 1:
        big = max(sizes, key=int)
        a, b = med(growth[big], "jobs_per_s"), med(growth["0"], "jobs_per_s")
        t.append(
            _target(
                f"growth: claim+complete with {int(big):,} finished vs empty",
                ">= 0.80",
                a / b,
                a / b >= 0.8,
                f"{a:,.0f}/s vs {b:,.0f}/s"
                + ("" if big == "1000000" else " (quick mode: not the 1,000,000 of the target)"),
            )
        )
    notify = r.get("notify", {})
    for producers in ("8", "32"):
        for state, mode in (("on", "always"), ("when_waiting", "when_waiting")):
            if producers not in notify or state not in notify[producers]:
                continue
            on, off = (
                med(notify[producers][state], "jobs_per_s"),
                med(notify[producers]["off"], "jobs_per_s"),
            )
            cost = 1 - on / off
            t.append(
                _target(
                    f"NOTIFY: throughput lost to the trigger, {producers} producers"
                    f" (notify = {mode})",
                    "<= 15 %" if producers == "8" else "report",
                    cost,
                    cost <= 0.15 if producers == "8" else None,
                    f"on {on:,.0f}/s vs off {off:,.0f}/s",
                )
            )
    scopes = r.get("scopes", {})
    if scopes:
        a, b = med(scopes["scoped_100"], "jobs_per_s"), med(scopes["unscoped"], "jobs_per_s")
        t.append(
            _target(
                "scopes: 100 scopes vs unscoped drain",
                ">= 0.50",
                a / b,
                a / b >= 0.5,
                f"{a:,.0f}/s vs {b:,.0f}/s",
            )
        )
    memory = r.get("memory", {})
    if "pgqueue_c50" in memory and "lean_c50" in memory:
        a, b = med(memory["pgqueue_c50"], "peak_mib"), med(memory["lean_c50"], "peak_mib")
        t.append(
            _target(
                "memory: worker peak resident memory vs the minimal asyncpg worker",
                "report",
                a / b,
                None,
                f"{a:.1f} MiB vs {b:.1f} MiB, concurrency 50,"
                f" {r['meta']['config']['memory_rounds']} drains",
            )
        )
        grows = med(memory["pgqueue_c50"], "last_round_kib_per_1k")
        t.append(
            _target(
                "memory: worker resident memory added per 1,000 jobs, after warm-up",
                "report",
                grows,
                None,
                f"{grows:.1f} KiB (the minimal worker:"
                f" {med(memory['lean_c50'], 'last_round_kib_per_1k'):.1f} KiB); about 0 is no leak",
            )
        )
    if "enqueue" in memory:
        a, b = med(memory["enqueue"], "pgqueue_many_kib"), med(memory["enqueue"], "raw_unnest_kib")
        t.append(
            _target(
                "memory: enqueue_many's Python memory vs raw unnest",
                "report",
                a / b,
                None,
                f"{a:,.0f} KiB vs {b:,.0f} KiB for {r['meta']['config']['bulk_n']:,} jobs",
            )
        )
    pipe = r.get("pipeline", {})
    if "fanout_1000" in pipe and "independent_1000" in pipe:
        a, b = med(pipe["fanout_1000"]), med(pipe["independent_1000"])
        t.append(
            _target(
                "pipeline: 1 -> 1,000 + join vs 1,000 independent jobs",
                "<= 1.5x",
                a / b,
                a / b <= 1.5,
                f"{a * 1000:.1f} ms vs {b * 1000:.1f} ms",
            )
        )
    return t


# --------------------------------------------------------------------------- text output


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2f}{unit}"


def _scaled(s: dict[str, Any], factor: float) -> dict[str, Any]:
    """A summary with every figure multiplied by ``factor`` (seconds to milliseconds)."""
    if s.get("median") is None:
        return s
    keys = ("median", "min", "max")
    return {**s, **{k: s[k] * factor for k in keys}, "runs": [x * factor for x in s["runs"]]}


def cell(s: dict[str, Any] | None, unit: str = "") -> str:
    """median (min–max) of a summary."""
    if not s or s.get("median") is None:
        return "–"
    if len(s.get("runs", [])) > 1:
        return f"{_fmt(s['median'], unit)} ({_fmt(s['min'])}–{_fmt(s['max'])})"
    return _fmt(s["median"], unit)


def target_rows(r: dict[str, Any]) -> list[str]:
    rows = ["| target | wanted | measured | pass | detail |", "|---|---|---|---|---|"]
    for t in r.get("targets", []):
        m = t["measured"]
        if m is None:
            shown = "–"
        elif "%" in t["wanted"]:
            shown = f"{m * 100:.1f} %"
        elif "ms" in t["wanted"]:
            shown = f"{m:.2f} ms"
        else:
            shown = f"{m:.2f}x" if "x" in t["wanted"] else f"{m:.2f}"
        ok = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "**FAIL**")
        rows.append(f"| {t['target']} | {t['wanted']} | {shown} | {ok} | {t['detail']} |")
    return rows


def print_summary(r: dict[str, Any]) -> None:
    print("\n".join(target_rows(r)))


DRAIN_LABELS = {
    "raw_k1_c1": "raw ceiling, k=1, 1 connection",
    "raw_k100_c10": "raw ceiling, k=100, 10 connections",
    "pgqueue_sql_k100_c10": "pgqueue SQL only: claim_next(100) + complete_many, 10 connections",
    "lean_c50": "minimal asyncpg worker on pgqueue's SQL, concurrency 50 (Python floor)",
    "pgqueue_c1": "pgqueue worker, concurrency 1",
    "pgqueue_c10": "pgqueue worker, concurrency 10",
    "pgqueue_c50": "pgqueue worker, concurrency 50",
    "pgqueue_c200": "pgqueue worker, concurrency 200",
    "pgqueue_c200_quiet": "pgqueue worker, concurrency 200, --log-level warning",
    "pgqueue_2x_c50": "two pgqueue workers, concurrency 50 each",
    "pgqueuer_b50": "PGQueuer, batch_size 50",
    "pgqueuer_b200": "PGQueuer, batch_size 200",
    "procrastinate_c10": "procrastinate, concurrency 10",
    "procrastinate_c50": "procrastinate, concurrency 50",
}


CHART_LABELS = {
    "pgqueue_sql_k100_c10": "pgqueue SQL only, k=100, 10 connections",
    "lean_c50": "minimal Python worker on pgqueue's SQL, c=50",
}


def chart(r: dict[str, Any], path: Path) -> bool:
    drain = r.get("drain")
    if not drain:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    xs = [c for c in (1, 10, 50, 200) if f"pgqueue_c{c}" in drain]
    ys = [med(drain[f"pgqueue_c{c}"], "jobs_per_s") for c in xs]
    lo = [
        med(drain[f"pgqueue_c{c}"], "jobs_per_s") - drain[f"pgqueue_c{c}"]["jobs_per_s"]["min"]
        for c in xs
    ]
    hi = [
        drain[f"pgqueue_c{c}"]["jobs_per_s"]["max"] - med(drain[f"pgqueue_c{c}"], "jobs_per_s")
        for c in xs
    ]
    ax.errorbar(
        xs,
        ys,
        yerr=[lo, hi],
        marker="o",
        color="tab:blue",
        capsize=3,
        label="pgqueue worker (1 process)",
    )
    if "pgqueue_2x_c50" in drain:
        ax.plot(
            [50],
            [med(drain["pgqueue_2x_c50"], "jobs_per_s")],
            marker="s",
            color="tab:cyan",
            linestyle="none",
            label="pgqueue, 2 processes × 50",
        )
    styles = [
        ("raw_k100_c10", "black", "-"),
        ("pgqueue_sql_k100_c10", "tab:blue", "-."),
        ("lean_c50", "tab:purple", "-."),
        ("raw_k1_c1", "gray", "-"),
        ("pgqueuer_b50", "tab:orange", "--"),
        ("pgqueuer_b200", "tab:red", "--"),
        ("procrastinate_c10", "tab:green", ":"),
        ("procrastinate_c50", "tab:olive", ":"),
    ]
    for key, color, ls in styles:
        if key in drain:
            v = med(drain[key], "jobs_per_s")
            ax.axhline(
                v,
                color=color,
                linestyle=ls,
                linewidth=1.2,
                label=f"{CHART_LABELS.get(key, DRAIN_LABELS[key])}: {v:,.0f}/s",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1, 10, 50, 200])
    ax.set_xticklabels(["1", "10", "50", "200"])
    ax.set_xlabel("worker concurrency (handler slots)")
    ax.set_ylabel("no-op jobs drained per second (log)")
    env = r["meta"]["environment"]
    pg_version = env["postgres"].split(" on ")[0].split(" (")[0]
    ax.set_title(
        f"Drain throughput: {env['cores']} cores, {pg_version}, {r['meta']['config']['mode']} run",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(path: Path) -> None:
    r = json.loads(path.read_text())
    has_chart = chart(r, CHART)
    meta, env = r["meta"], r["meta"]["environment"]
    cfg = meta["config"]
    L: list[str] = []
    L += [
        "# Benchmarks",
        "",
        "Every pgqueue figure is set against a **raw ceiling measured in the same run**: a plain",
        "table with hand-written SQL and no triggers, driven by asyncpg from one process. Peers",
        "(PGQueuer, procrastinate) run in the same run too, each in its own database and",
        "configured at its best, so every comparison is a ratio from one run on one machine.",
        "Cells read `median (min–max)` over the repetitions.",
        "",
        "## Reproduce",
        "",
        "```",
        "pip install -e '.[bench]'      # pgqueue plus the peers and matplotlib",
        "python -m bench --quick        # < 2 minutes, one repetition, small sizes",
        "python -m bench                # full: 3 repetitions, the sizes of the targets",
        "python -m bench --dsn postgresql://user@host:5432/postgres   # or $PGQUEUE_BENCH_DSN",
        "python -m bench.report bench/results/<file>.json             # redo this page from a run",
        "python -m bench.parts claim|enqueue|trigger --rounds N       # one call, part by part",
        "```",
        "",
        "The suite drops and creates the databases `pgqueue_bench`, `pgqueue_bench_pgqueuer` and",
        "`pgqueue_bench_procrastinate`, migrates with `pgqueue.migrate.upgrade`, and writes",
        "`bench/results/<timestamp>-<mode>.json`, this page and `docs/benchmarks-drain.png`.",
        "`bench.parts` times a single claim or enqueue against variants that each leave one part",
        "out (the CHECK constraints, indexes, the insert trigger, the function); section 15 of the",
        "analysis quotes it.",
        "",
        f"## This run: `{meta['command']}`",
        "",
        f"- started {meta['started']}, took {meta['seconds']} s; {cfg['reps']} repetition(s) per figure",
        f"- {env['postgres']}",
        f"- {env['cores']} cores ({env['cpu']}), Python {env['python']}, asyncpg {env['asyncpg']}, "
        f"PGQueuer {env['pgqueuer']}, procrastinate {env['procrastinate']}",
        f"- pgqueue at {env['git_commit']}",
        f"- load average at start {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in meta.get('loadavg_at_end', []))} "
        "(other work on the machine shows up here)",
        *_speed_line(env, meta),
        "- PostgreSQL settings: " + ", ".join(f"`{k}={v}`" for k, v in env["pg_settings"].items()),
        "",
        "## Targets",
        "",
    ]
    L += target_rows(r)
    if "enqueue" in r:
        e = r["enqueue"]
        L += [
            "",
            "## Enqueue (jobs/s)",
            "",
            f"Single calls run back to back for {cfg['enqueue_seconds']} s per connection, each its own",
            "transaction (so commit-bound: every call waits for a WAL flush). Bulk: one call with "
            f"{cfg['bulk_n']:,} jobs.",
            "",
            "| what | raw ceiling | pgqueue | ratio | PGQueuer | procrastinate |",
            "|---|---|---|---|---|---|",
        ]
        for n in (1, 8):
            b = e.get(f"raw_single_{n}")
            peer = n == 1
            for key, mode in (("pgqueue", "always"), ("pgqueue_ww", "when_waiting")):
                a = e.get(f"{key}_single_{n}")
                if a is None:
                    continue
                L.append(
                    f"| single call, {n} connection(s) | {cell(b)} (INSERT) | {cell(a)} "
                    f"`pgqueue.enqueue`, notify = {mode} "
                    f"| {_ratio(a, b)} | {cell(e.get('pgqueuer_single_1')) if peer else '–'} "
                    f"| {cell(e.get('procrastinate_single_1')) if peer else '–'} |"
                )
        L.append(
            f"| bulk {cfg['bulk_n']:,} | {cell(e.get('raw_unnest'))} (unnest) | {cell(e.get('pgqueue_many'))} "
            f"`enqueue_many` | {_ratio(e.get('pgqueue_many'), e.get('raw_unnest'))} "
            f"| {cell(e.get('pgqueuer_bulk'))} | {cell(e.get('procrastinate_bulk'))} |"
        )
        L.append(
            f"| bulk {cfg['bulk_n']:,} | {cell(e.get('raw_copy'))} (COPY) | {cell(e.get('pgqueue_many'))} "
            f"| {_ratio(e.get('pgqueue_many'), e.get('raw_copy'))} | | |"
        )
    if "drain" in r:
        d = r["drain"]
        ceiling = d.get("raw_k100_c10", {}).get("jobs_per_s")
        L += [
            "",
            "## Drain",
            "",
            f"No-op jobs: {cfg['drain_n']:,} per run ({cfg['drain_n_c1']:,} at concurrency 1, "
            f"{cfg['peer_drain_n']:,} for PGQueuer, {cfg['procrastinate_n']:,} for procrastinate, "
            f"{cfg['raw_k100_n']:,} / {cfg['raw_k1_n']:,} for the raw k=100 / k=1 loops).",
            "Workers are started idle; the jobs are inserted in one transaction; the clock runs from",
            "that commit's acknowledgement until a 10 ms poll sees no queued or running job. CPU is",
            "read from `/proc` over the same window: the worker process(es), and PostgreSQL (backends",
            "of the benchmark database plus WAL writer, checkpointer, background writer). For the raw",
            'and SQL-only loops the "worker" column is the one process driving them. pgqueue\'s',
            "enqueue transaction also runs `ANALYZE pgqueue.jobs` (the raw table is analysed after",
            "its COPY), so the plans see current statistics; see section 3 of the analysis for",
            f"what stale ones do. The SQL-only loop drains {cfg['raw_k100_n'] // 2:,} jobs. The",
            "quiet concurrency-200 drain and PGQueuer's two configurations take turns (one run of",
            "each, then the next round), since the drain target is their ratio.",
            "",
            "| configuration | jobs/s | vs raw k=100 | worker CPU ms / 1,000 jobs | PostgreSQL CPU ms / 1,000 jobs |",
            "|---|---|---|---|---|",
        ]
        for key, label in DRAIN_LABELS.items():
            if key in d and isinstance(d[key], dict):
                x = d[key]
                cpu_key = (
                    "worker_cpu_ms_per_1k"
                    if "worker_cpu_ms_per_1k" in x
                    else "client_cpu_ms_per_1k"
                )
                L.append(
                    f"| {label} | {cell(x['jobs_per_s'])} | {_ratio(x['jobs_per_s'], ceiling)} "
                    f"| {cell(x.get(cpu_key))} | {cell(x.get('pg_cpu_ms_per_1k'))} |"
                )
        if has_chart:
            L += ["", "![drain throughput by concurrency](benchmarks-drain.png)"]
    if "latency" in r:
        lat = r["latency"]
        L += [
            "",
            "## Pickup latency (idle worker)",
            "",
            f"{cfg['latency_n']} jobs offered one at a time at ~{cfg['latency_rate']:.0f}/s; latency = handler "
            "start (wall clock in the worker) minus the producer's commit acknowledgement, in ms. "
            "The raw ceiling LISTENs on a plain table's statement-level insert trigger and claims "
            "with one UPDATE; `raw` runs that consumer in the benchmark's own process, beside the "
            "producer (the ceiling the targets use), `raw, own process` runs the same code in a "
            "process of its own, as every worker (pgqueue's and the peers') runs: the difference is "
            "the cost of waking another process. It can be slightly negative: PostgreSQL signals "
            "listeners at commit, before the producer reads its own acknowledgement.",
            "",
            "| system | p50 | p95 | p99 | max |",
            "|---|---|---|---|---|",
        ]
        for name in ("raw", "raw_process", "pgqueue", "pgqueuer", "procrastinate"):
            if name in lat:
                x = lat[name]
                label = "raw, own process" if name == "raw_process" else name
                L.append(
                    f"| {label} | {cell(x['p50'])} | {cell(x['p95'])} | {cell(x['p99'])} | {cell(x['max'])} |"
                )
    if "growth" in r:
        g = r["growth"]
        L += [
            "",
            "## Claim cost as the table grows",
            "",
            f"`claim_next(batch_size => 1)` + `complete` per job, {cfg['growth_claims']:,} jobs, one "
            "connection with `synchronous_commit = off` for that session (so the figure measures "
            "the statements, not the WAL flush), with N finished jobs present (inserted directly, "
            "then `VACUUM ANALYZE`), and after `prune(interval '0')` (no vacuum: autovacuum is "
            f"`{env['pg_settings'].get('autovacuum')}` on this server).",
            "",
            "| finished jobs present | claim+complete jobs/s | vs empty | dead tuples after | table | indexes |",
            "|---|---|---|---|---|---|",
        ]
        base = g.get("0", {}).get("jobs_per_s")
        for k in [k for k in g if k.isdigit()] + ["after_prune"]:
            if k not in g:
                continue
            tb = g[k].get("table", {})
            label = f"{int(k):,}" if k.isdigit() else f"after prune of {g[k]['pruned']:,}"
            L.append(
                f"| {label} | {cell(g[k]['jobs_per_s'])} | {_ratio(g[k]['jobs_per_s'], base)} "
                f"| {tb.get('n_dead_tup', '–'):,} | {_mb(tb.get('table_bytes'))} | {_mb(tb.get('index_bytes'))} |"
            )
        big = max((k for k in g if k.isdigit()), key=int)
        L += [
            "",
            f"Plan of the claim's pick with {int(big):,} finished jobs present:",
            "",
            "```",
            g[big]["plan"],
            "```",
        ]
        if "bloat" in g:
            b = g["bloat"]
            L += [
                "",
                f"Around a {b['jobs']:,}-job drain by one worker (concurrency 50):",
                "",
                "| | live tuples | dead tuples | table | indexes | `jobs_ready` index |",
                "|---|---|---|---|---|---|",
            ]
            for when in ("before", "after"):
                x = b[when]
                L.append(
                    f"| {when} | {x.get('n_live_tup', 0):,} | {x.get('n_dead_tup', 0):,} | {_mb(x.get('table_bytes'))} "
                    f"| {_mb(x.get('index_bytes'))} | {_mb(x.get('ready_index_bytes'))} |"
                )
    if "notify" in r:
        nt = r["notify"]
        L += [
            "",
            "## NOTIFY overhead",
            "",
            f"Single-call `enqueue` for {cfg['notify_seconds']} s from 8 and 32 connections, with the "
            "`jobs_notify_inserted` trigger enabled (`on`: `settings.notify = always`, the default, "
            "every enqueue notifies; `when_waiting`: notifies only waiting workers, and none waits "
            "here, as when every worker is busy) and disabled (`off`: `ALTER TABLE pgqueue.jobs "
            "DISABLE TRIGGER jobs_notify_inserted`, same build), interleaved. Wait events: "
            "`pg_stat_activity` sampled every 100 ms; the figure is the average number of producer "
            "backends in that state per sample.",
            "",
            "| producers | trigger | jobs/s | cost | wait events (avg backends per sample) |",
            "|---|---|---|---|---|",
        ]
        for p in ("8", "32"):
            if p in nt:
                off = nt[p]["off"]["jobs_per_s"]
                for state in ("on", "when_waiting", "off"):
                    if state not in nt[p]:
                        continue
                    x = nt[p][state]
                    cost = (
                        ""
                        if state == "off"
                        else f"{(1 - med(x['jobs_per_s']) / med(off)) * 100:.1f} %"
                    )
                    waits = ", ".join(f"{k} {v}" for k, v in list(x["waits"].items())[:6])
                    L.append(f"| {p} | {state} | {cell(x['jobs_per_s'])} | {cost} | {waits} |")
    if "pipeline" in r:
        p = r["pipeline"]
        L += [
            "",
            "## Pipelines",
            "",
            "One worker (concurrency 50). From the root's commit (the independent jobs': one",
            "`enqueue_many`) to the last job's `finished_at` (the server's clock, same machine).",
            f"Each shape runs {len(next(iter(p.values()), {}).get('runs', []))} times, the shapes"
            " taking turns.",
            "",
            "| shape | ms |",
            "|---|---|",
        ]
        for k, v in p.items():
            label = (
                f"1 -> {k.split('_')[1]} -> join"
                if k.startswith("fanout")
                else f"{k.split('_')[1]} independent jobs (enqueue_many)"
            )
            L.append(f"| {label} | {cell(_scaled(v, 1000))} |")
    if "scopes" in r:
        s = r["scopes"]
        L += [
            "",
            "## Scoped drain",
            "",
            f'{cfg["scoped_n"]:,} no-op jobs, one worker at concurrency 50; `scope = {{"s": i % 100}}` vs none.',
            "The two drains take turns, one run of each at a time.",
            "",
            "| | jobs/s | worker CPU ms / 1,000 | PostgreSQL CPU ms / 1,000 |",
            "|---|---|---|---|",
        ]
        for k in ("unscoped", "scoped_100"):
            if k in s:
                L.append(
                    f"| {k.replace('_100', ' (100 scopes)')} | {cell(s[k]['jobs_per_s'])} "
                    f"| {cell(s[k]['worker_cpu_ms_per_1k'])} | {cell(s[k]['pg_cpu_ms_per_1k'])} |"
                )
    if "memory" in r:
        m = r["memory"]
        L += [
            "",
            "## Memory",
            "",
            "Resident memory (`VmRSS`, and `VmHWM` for the peak) of worker processes, read from",
            "`/proc`. The floor is `bench.lean_worker`: the least a Python worker can be on this SQL",
            "(asyncio, three asyncpg connections, no retries, logging or timeouts). One process",
            f"of each drains {cfg['memory_rounds']} batches of {cfg['memory_n']:,} no-op jobs at",
            "concurrency 50, read when idle and after each batch; what the last batch adds, per",
            "1,000 jobs, is what a worker running for weeks would keep adding. The two take turns.",
            "",
            "| worker | idle MiB | after the first batch | after the last | peak | KiB added per 1,000 jobs in the last batch |",
            "|---|---|---|---|---|---|",
        ]
        for k, label in (
            ("pgqueue_c50", "`pgqueue worker`"),
            ("lean_c50", "minimal asyncpg worker"),
        ):
            if k in m:
                x = m[k]
                L.append(
                    f"| {label} | {cell(x['idle_mib'])} | {cell(x['after_first_mib'])} "
                    f"| {cell(x['after_last_mib'])} | {cell(x['peak_mib'])} "
                    f"| {cell(x['last_round_kib_per_1k'])} |"
                )
        d = r.get("drain", {})
        peaks = [
            (label, d[k]["worker_peak_mib"])
            for k, label in DRAIN_LABELS.items()
            if isinstance(d.get(k), dict) and "worker_peak_mib" in d[k]
        ]
        if peaks:
            L += [
                "",
                "Peak resident memory of each drain's worker process (the largest of two processes):",
                "",
                "| drain | peak MiB |",
                "|---|---|",
                *(f"| {label} | {cell(v)} |" for label, v in peaks),
            ]
        if "enqueue" in m:
            e = m["enqueue"]
            L += [
                "",
                f"Python memory of one bulk enqueue of {cfg['bulk_n']:,} jobs, the input made beforehand",
                "(`tracemalloc`'s peak during the call: asyncpg's encoding buffers, the result rows):",
                "",
                "| call | peak KiB |",
                "|---|---|",
                f"| raw `INSERT ... SELECT FROM unnest($1, $2) RETURNING id` | {cell(e['raw_unnest_kib'])} |",
                f"| `app.enqueue_many(conn, specs)` | {cell(e['pgqueue_many_kib'])} |",
            ]
    if ANALYSIS.exists():
        L += ["", ANALYSIS.read_text().rstrip()]
    L += ["", f"_Generated by `bench/report.py` from `{path.relative_to(REPO)}`._", ""]
    DOC.write_text("\n".join(L))
    print(
        f"wrote {DOC.relative_to(REPO)}" + (f" and {CHART.relative_to(REPO)}" if has_chart else "")
    )


def _ratio(a: Any, b: Any) -> str:
    ma, mb = med(a), med(b)
    if not ma or not mb:
        return "–"
    return f"{ma / mb:.2f}"


def _mb(v: Any) -> str:
    return "–" if v is None else f"{v / 1e6:.1f} MB"


def _speed_line(env: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The machine-speed probe, in runs that recorded it."""
    if "speed_probe_ms_at_start" not in env:
        return []
    end = meta.get("speed_probe_ms_at_end")
    return [
        f"- speed probe (a fixed pure-Python loop, best of 5): {env['speed_probe_ms_at_start']} ms "
        f"at start, {end} ms at end. Ratios cancel the machine's speed; the absolute CPU figures "
        "(the worker-CPU target's ms per 1,000 jobs) scale with this probe"
    ]


if __name__ == "__main__":
    write_report(Path(sys.argv[1]).resolve())
