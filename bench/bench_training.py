"""Training arms on the same preference groups: training time and peak memory (CPU or GPU), and the held-out
metrics of each trained adapter (issue 13, section 4; docs/training.md).

Steps (each arm in its own process, so that peak RSS is the arm's own):
1. ``--build``: preference groups of the warehouse's published runs (``persona_tasks.train.pipeline``: snapshot,
   K candidates per cluster from the current labeller, validation, quality scores, ranks) and the current
   labeller's held-out metrics, into ``<retrain dir>``.
2. per arm (base, pairwise, groupwise, sft): ``train_arm`` on those groups for ``--steps`` optimiser steps, then the
   adapter on the same held-out clusters (``evaluate_labeller``: fallback rate, objective, truthfulness, alignment).

Usage: python bench/bench_training.py --warehouse W [--build] [--arms base,pairwise,groupwise,sft] [--steps 8]
       [--threads 1] [--out bench/results/training_arms_cpu.json]

Settings chosen on the held-out clusters are then scored on fresh ones: ``--remeasure-current --heldout-skip 100
--heldout 300`` measures the current labeller again on the 300 held-out clusters after the first 100 (those the
settings were chosen on), and every arm of the run is scored on those. ``--tag T`` keeps a run's adapters apart
(``bench-<arm>-T``); ``--learning-rate`` / ``--beta`` override ``[training]``.

With a GPU machine (no warehouse there), in two GPU runs of ``bench/gpu_session.py``:
1. ``--export-gpu DIR``: the training clusters (``DIR/candidates/train.json``) and the held-out clusters
   (``DIR/label/heldout.json``) as the labeller sees them. The first GPU run samples K candidates per training
   cluster and labels the held-out clusters with the base model.
2. ``--build-from-gpu OUT1``: the groups, validated, scored and ranked here from those candidates, to
   ``groups.json``; ``current.json`` = the base model's held-out labels. The second GPU run trains every arm on
   the groups and labels the held-out clusters with each.
3. ``--replay OUT2``: scores each arm's held-out labels (``labels_<arm>_heldout.json``) here, with the same quality
   objective, against the base model's labels of the same clusters (paired, bootstrap interval).
The warehouse needs published personas (``persona-etl induce``); nothing is promoted.

The evaluation's Hit@10 per arm (issue 13, section 4): export the LLM sample's inputs once
(``persona-etl evaluate --export-llm-inputs DIR --llm-max-users N --json ...``), give ``--label-inputs DIR`` (each
arm labels them into ``--labels-out``), run ``persona-etl evaluate --llm-max-users N --llm-labels
<labels-out>/labels_<arm>_<dataset>.json ... --json E_<arm>.json`` per arm, then ``--attach-eval arm=E_<arm>.json ...``
adds the figures to ``--out``; ``persona-etl evaluate --from-json <a run> --write-docs`` renders the table into
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def settings_for(args):
    from persona_tasks.config import load_settings

    s = load_settings(warehouse=args.warehouse, threads=args.threads)
    s.training = s.training.model_copy(update={
        "threads": args.threads, "max_steps": args.steps, "max_clusters": args.clusters,
        "heldout_max_clusters": args.heldout, "num_candidates": args.k, "groups_per_batch": args.groups_per_batch,
        "holdout_fraction": args.holdout_fraction, "save_steps": 10_000,
        **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
        **({"beta": args.beta} if args.beta else {})})
    return s


def one_arm(args) -> dict:
    """Train and evaluate one arm in this process; prints one JSON line."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.llm import LLMLabeller
    from persona_tasks.labelling.model import load_causal_lm
    from persona_tasks.train import pipeline as P
    from persona_tasks.train.groups import read_build
    from persona_tasks.train.trainer import train_arm

    s = settings_for(args)
    d = P.retrain_dir(s, args.as_of)
    build = read_build(d / "groups")
    groups = build.training_groups()
    name = f"{args.one_arm}-{args.tag}" if args.tag else args.one_arm  # adapters and labels of a tagged run
    arm_dir = d / f"bench-{name}"
    reused = bool(args.reuse_adapters and (arm_dir / "train_result.json").exists())
    if reused:
        # score an adapter trained by an earlier run (e.g. under a new decoding grammar) without retraining it
        from persona_tasks.train.trainer import TrainResult

        res = TrainResult.read(arm_dir)
    else:
        res = train_arm(s, args.one_arm, groups, arm_dir)
    train = res.as_dict()
    logs = [h for h in res.log_history if "loss" in h]
    out = {"arm": args.one_arm, "groups": len(groups), "rows": res.n_examples, "steps": res.steps,
           "train_seconds": res.seconds, "seconds_per_step": round(res.seconds / max(res.steps, 1), 2),
           "peak_rss_mb_after_train": train["peak_rss_mb"], "peak_cuda_mb": train["peak_cuda_mb"],
           "device": res.device, "adapter_reused": reused and res.adapter_dir is not None,
           "first_log": logs[0] if logs else None, "last_log": logs[-1] if logs else None}
    embedder = embedder_from_settings(s)
    data = P._clusters(s, build.as_of, embedder)
    current = json.loads((d / "current.json").read_text())
    keys = {(c.user_id, int(c.cluster_id)): i for i, c in enumerate(data.clusters)}
    held = [keys[(u, c)] for u, c in current["keys"] if (u, c) in keys]
    base, tok, version = load_causal_lm(s, adapter=False)
    model = base
    if res.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(res.adapter_dir)).merge_and_unload().eval()
        version += f"+bench-{args.one_arm}"
    labeller = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
    m = P.evaluate_labeller(s, data, held, labeller, embedder)
    out["heldout"] = {k: m[k] for k in ("clusters", "fallback_rate", "objective", "truthfulness", "alignment",
                                        "cohesion", "seconds", "per_cluster_objective")}
    out["heldout_vs_current"] = P.paired_difference(m["per_cluster_objective"], current["per_cluster_objective"])
    if args.label_inputs:
        # the evaluation's LLM sample (persona-etl evaluate --export-llm-inputs), labelled by this arm, for
        # persona-etl evaluate --llm-labels (Hit@10 per arm)
        from persona_tasks.labelling.replay import label_inputs_file

        out["eval_labels"] = {}
        for f in sorted(Path(args.label_inputs).glob("*.json")):
            dest = Path(args.labels_out) / f"labels_{name}_{f.stem}.json"
            fresh = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)  # stats of this file only
            st = label_inputs_file(f, dest, fresh, meta={"arm": args.one_arm, "inputs": f.name})
            out["eval_labels"][f.stem] = {"path": str(dest), "clusters": st.get("clusters"), "wall_s": st["wall_s"],
                                          "fallback_rate": st.get("fallback_rate")}
    import resource

    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(out, default=str), flush=True)
    return out


def _heldout(s, as_of: str):
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.train import pipeline as P

    embedder = embedder_from_settings(s)
    data = P._clusters(s, as_of, embedder)
    current = json.loads((P.retrain_dir(s, as_of) / "current.json").read_text())
    keys = {(c.user_id, int(c.cluster_id)): i for i, c in enumerate(data.clusters)}
    held = [keys[(u, c)] for u, c in current["keys"] if (u, c) in keys]
    return data, held, current, embedder


def export_gpu(args) -> None:
    """The snapshot's training and held-out clusters, as the labeller sees them, for bench/gpu_session.py:
    ``candidates/train.json`` (K candidates each are sampled there) and ``label/heldout.json``."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.replay import write_inputs
    from persona_tasks.train import pipeline as P

    s = settings_for(args)
    if not (P.retrain_dir(s, args.as_of) / "snapshot.duckdb").exists():
        P.snapshot(s, args.as_of)
    data = P._clusters(s, args.as_of, embedder_from_settings(s))
    idx = data.subset("train", s.training.max_clusters)
    held = data.subset("heldout", s.training.heldout_max_clusters)
    out = Path(args.export_gpu)
    write_inputs([data.masked[i] for i in idx], out / "candidates" / "train.json",
                 meta={"as_of": str(args.as_of), "clusters": len(idx)})
    write_inputs([data.masked[i] for i in held], out / "label" / "heldout.json",
                 meta={"as_of": str(args.as_of), "clusters": len(held)})
    print(f"wrote {len(idx)} training and {len(held)} held-out clusters to {out}")


def build_from_gpu(args) -> dict:
    """Preference groups from the candidates a GPU run sampled (``candidates_train.json``), validated, scored and
    ranked here (``build_groups`` with ``ReplayCandidates``); the base model's held-out labels from the same run
    are the current labeller's metrics (``current.json``). Writes ``groups.json`` for the training run."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.model import load_causal_lm
    from persona_tasks.labelling.replay import ReplayCandidates, ReplayLabeller
    from persona_tasks.train import pipeline as P
    from persona_tasks.train.groups import build_groups, save_build

    s = settings_for(args)
    src = Path(args.build_from_gpu)
    d = P.retrain_dir(s, args.as_of)
    if not (d / "snapshot.duckdb").exists():
        P.snapshot(s, args.as_of)
    embedder = embedder_from_settings(s)
    data = P._clusters(s, args.as_of, embedder)
    model, tok, version = load_causal_lm(s, adapter=False)
    checker = P.candidate_labeller(s, model, tok, version)
    t0 = time.perf_counter()
    build = build_groups(s, data, ReplayCandidates(checker, src / "candidates_train.json"), embedder)
    save_build(build, d / "groups")
    groups = build.training_groups()
    held = data.subset("heldout", s.training.heldout_max_clusters)
    current = P.evaluate_labeller(s, data, held, ReplayLabeller(src / "labels_base_heldout.json"), embedder)
    (d / "current.json").write_text(json.dumps(current, indent=1))
    out = Path(args.groups_out or src)
    out.mkdir(parents=True, exist_ok=True)
    (out / "groups.json").write_text(json.dumps(groups))
    stats = {"as_of": str(args.as_of), "build_id": build.build_id, **build.stats, "seconds_here": round(time.perf_counter()
             - t0, 1), "current_objective": current["objective"], "training_groups": len(groups)}
    (out / "build.json").write_text(json.dumps(stats, indent=1, default=str))
    print("groups:", json.dumps(stats, default=str))
    return stats


def replay(args) -> dict:
    """Score the GPU run's held-out labels per arm (``labels_<arm>_heldout.json``) on the same clusters."""
    from persona_tasks.labelling.replay import ReplayLabeller
    from persona_tasks.train import pipeline as P

    s = settings_for(args)
    src = Path(args.replay)
    data, held, current, embedder = _heldout(s, args.as_of)
    summary = json.loads((src / "summary.json").read_text())
    arms = {}
    for f in sorted(src.glob("labels_*_heldout.json")):
        arm = f.name[len("labels_"):-len("_heldout.json")]
        m = P.evaluate_labeller(s, data, held, ReplayLabeller(f), embedder)
        arms[arm] = m
        print(f"{arm:9s} held-out fallback {m['fallback_rate']:.3f} objective {m['objective']:.4f} "
              f"truthfulness {m['truthfulness']:.4f} alignment {m['alignment']:.4f}", flush=True)
    out = {"as_of": str(args.as_of), "gpu": {k: summary.get(k) for k in ("device_name", "torch", "transformers",
                                                                      "model_version", "training", "seconds")},
           "current_cpu": {k: current.get(k) for k in ("clusters", "model_version", "fallback_rate", "objective",
                                                       "truthfulness", "alignment", "cohesion")},
           "arms": {}}
    base = arms.get("base")
    for arm, m in arms.items():
        row = {k: m[k] for k in ("clusters", "model_version", "fallback_rate", "objective", "truthfulness",
                                 "alignment", "cohesion")}
        if base is not None and arm != "base":
            row["objective_vs_base"] = P.paired_difference(m["per_cluster_objective"], base["per_cluster_objective"])
        row["objective_vs_current_cpu"] = P.paired_difference(m["per_cluster_objective"],
                                                              current["per_cluster_objective"])
        tr = (summary.get("steps", {}).get("train") or {}).get(arm)
        if tr:
            row["train"] = {k: tr.get(k) for k in ("n_groups", "n_examples", "steps", "seconds", "peak_cuda_mb",
                                                   "peak_rss_mb", "device", "first_log", "last_log")}
        lab = (summary.get("steps", {}).get("labels") or {}).get(f"{arm}:heldout")
        if lab:
            row["label_seconds_gpu"] = lab.get("wall_s")
        out["arms"][arm] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return out


def attach_eval(args) -> dict:
    """Attach each arm's evaluation (``persona-etl evaluate --llm-labels`` of the labels ``--label-inputs`` wrote) to
    the arms results file ``--out``, under the evaluation file's name: per dataset the LLM sample's users, fallback,
    objective, truthfulness and multi-persona Hit@10 against the extractive labels' on the same users
    (``evaluate.llm_sample_summary``). An arm may have several (say 20 users, then 200 with the same adapter)."""
    from persona_tasks.evaluate import llm_sample_summary

    results = json.loads(args.out.read_text())
    for spec in args.attach_eval:
        arm, _, path = spec.partition("=")
        if arm not in results["arms"] or not path:
            raise SystemExit(f"--attach-eval {spec!r}: use ARM=EVALUATE_JSON with an arm of {args.out}")
        ev = json.loads(Path(path).read_text())
        r = results["arms"][arm]
        evals = r.setdefault("evals", {})
        if "eval" in r:  # a file attached before evaluations were kept per file
            evals.setdefault(r.pop("eval_file", "earlier evaluation"), r.pop("eval"))
        # kept per evaluation file: a 200-user evaluation joins the arm's 20-user one instead of replacing it
        evals[Path(path).name] = summary = llm_sample_summary(ev)
        for name, m in summary.items():
            print(f"{arm:9s} {name}: {m['users']} users, fallback {m['fallback_rate']:.3f}, Hit@10 "
                  f"{100 * m['hit@10']:.2f} vs extractive {100 * m['hit@10_extractive']:.2f}", flush=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warehouse", type=Path, required=True)
    ap.add_argument("--as-of", default=None)
    ap.add_argument("--build", action="store_true", help="build the groups first")
    ap.add_argument("--arms", default="base,pairwise,groupwise,sft")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=12)
    ap.add_argument("--heldout", type=int, default=10)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--groups-per-batch", type=int, default=2)
    ap.add_argument("--holdout-fraction", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "training_arms_cpu.json")
    ap.add_argument("--one-arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reuse-adapters", action="store_true",
                    help="score each arm's adapter from an earlier run of the same --as-of instead of training it")
    ap.add_argument("--learning-rate", type=float, default=None, help="override [training] learning_rate")
    ap.add_argument("--beta", type=float, default=None, help="override [training] beta")
    ap.add_argument("--tag", default=None, help="adapters go to <retrain dir>/bench-<arm>-<tag> (keeps other runs')")
    ap.add_argument("--remeasure-current", action="store_true",
                    help="measure the current labeller again on --heldout clusters (current.json) before the arms")
    ap.add_argument("--heldout-skip", type=int, default=0,
                    help="with --remeasure-current: pass over the first N held-out clusters (those settings were "
                         "chosen on), so the arms are scored on fresh ones")
    ap.add_argument("--label-inputs", type=Path, default=None,
                    help="also label these exported evaluation inputs (persona-etl evaluate --export-llm-inputs DIR) "
                         "with each arm, for persona-etl evaluate --llm-labels")
    ap.add_argument("--attach-eval", nargs="+", default=None, metavar="ARM=JSON",
                    help="attach persona-etl evaluate results (run with --llm-labels of an arm's labels) to --out")
    ap.add_argument("--labels-out", type=Path, default=ROOT / "bench" / "out" / "training_labels",
                    help="where --label-inputs writes labels_<arm>_<dataset>.json")
    ap.add_argument("--export-gpu", type=Path, default=None, help="write groups + held-out inputs for a GPU run")
    ap.add_argument("--replay", type=Path, default=None, help="score a GPU run's held-out labels (its --out folder)")
    ap.add_argument("--build-from-gpu", type=Path, default=None,
                    help="build the groups from a GPU run's sampled candidates (its --out folder)")
    ap.add_argument("--groups-out", type=Path, default=None, help="where --build-from-gpu writes groups.json")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PERSONA_ETL_THREADS", str(args.threads))
    if args.one_arm:
        one_arm(args)
        return
    if args.attach_eval:
        attach_eval(args)
        return
    if args.export_gpu or args.replay or args.build_from_gpu:
        if args.as_of is None:
            raise SystemExit("--as-of is needed")
        from datetime import date

        args.as_of = date.fromisoformat(str(args.as_of))
        if args.export_gpu:
            export_gpu(args)
        elif args.build_from_gpu:
            build_from_gpu(args)
        else:
            replay(args)
        return
    from persona_tasks.train import pipeline as P

    s = settings_for(args)
    t0 = time.perf_counter()
    build = None
    if args.build:
        snap = P.snapshot(s, args.as_of)
        args.as_of = snap["as_of"]
        build = P.build_groups_step(s, args.as_of)
        build["seconds_total"] = round(time.perf_counter() - t0, 1)
        print("groups:", json.dumps(build), flush=True)
    elif args.as_of is None:
        raise SystemExit("--as-of is needed without --build")
    if args.remeasure_current:
        print("current:", json.dumps(P.measure_current_step(s, args.as_of, args.heldout_skip)), flush=True)
    current = json.loads((P.retrain_dir(s, args.as_of) / "current.json").read_text())
    results = {"as_of": args.as_of, "threads": args.threads, "steps": args.steps, "k": args.k,
               "learning_rate": s.training.learning_rate, "beta": s.training.beta, "tag": args.tag,
               "heldout_skip": args.heldout_skip if args.remeasure_current else None,
               "groups_per_batch": args.groups_per_batch, "build": build,
               "current": {k: current.get(k) for k in ("clusters", "model_version", "fallback_rate", "objective",
                                                       "truthfulness", "alignment", "cohesion", "seconds")},
               "arms": {}}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--warehouse", str(args.warehouse), "--as-of", args.as_of, "--one-arm", arm,
               "--steps", str(args.steps), "--clusters", str(args.clusters), "--heldout", str(args.heldout),
               "--k", str(args.k), "--groups-per-batch", str(args.groups_per_batch),
               "--holdout-fraction", str(args.holdout_fraction), "--threads", str(args.threads),
               "--labels-out", str(args.labels_out)]
        if args.learning_rate:
            cmd += ["--learning-rate", str(args.learning_rate)]
        if args.beta:
            cmd += ["--beta", str(args.beta)]
        if args.tag:
            cmd += ["--tag", args.tag]
        if args.reuse_adapters:
            cmd += ["--reuse-adapters"]
        if args.label_inputs:
            cmd += ["--label-inputs", str(args.label_inputs)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results["arms"][arm] = {"error": proc.stderr[-2000:]}
            print(f"{arm}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        r["process_seconds"] = round(time.perf_counter() - t, 1)
        results["arms"][arm] = r
        h = r["heldout"]
        print(f"{arm:9s} steps {r['steps']:3d} train {r['train_seconds']:7.1f}s ({r['seconds_per_step']:.2f} s/step) "
              f"peak RSS {r['peak_rss_mb']:.0f} MB | held-out fallback {h['fallback_rate']:.3f} objective "
              f"{h['objective']:.3f} truthfulness {h['truthfulness']:.3f} alignment {h['alignment']:.3f} "
              f"diff vs current {r['heldout_vs_current']}", flush=True)
    base = results["arms"].get("base", {}).get("heldout", {}).get("per_cluster_objective")
    if base:
        # the untrained labeller of this run (same grammar and prompts) as the baseline, beside the snapshot's
        for arm, r in results["arms"].items():
            if arm != "base" and "heldout" in r:
                r["heldout_vs_base"] = P.paired_difference(r["heldout"]["per_cluster_objective"], base)
                print(f"{arm:9s} objective vs this run's base arm {r['heldout_vs_base']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
