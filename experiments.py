"""The paper's comparisons in miniature: each README table is one subcommand that trains its arms with
train_i2i.py, train_t2i.py and train_nvs.py, seed by seed, and writes each finished run's numbers as
they come.

    python experiments.py t2i-data      # T2I from the I2I prior on N/10 captions vs from scratch on N
    python experiments.py nvs-priors    # NVS from no prior, from the T2I prior, from the I2I prior
    python experiments.py conditions    # I2I on the CLS, the patch tokens or all; then T2I from each
    python experiments.py repa          # I2I with REPA: steps to the default's final agreement
    python experiments.py t2i-data --seeds 0 1 2 3 4 -- --steps 600   # what follows -- goes to every run

(--depth, --hidden-size and --num-heads after -- go to the runs from scratch only: a run from a prior
has the prior's size.)

t2i-data (the paper's data-efficiency claim): T2I fine-tuned from the I2I prior on the first N/10
captioned `shapes` images, against T2I from random weights on all N, with train_t2i.py's steps and
batch for both. Scored on the final grid's held-out captions: how often a sample shows each stated
attribute, and the distance of the samples' attribute distribution to the references'
(train_t2i.caption_accuracy).
nvs-priors (the paper's NVS table): NVS fine-tuned on the `multiview` set from random weights, from
the T2I prior (t2i-data's from-scratch run of the same seed, so that no I2I weights leak in) and from
the I2I prior, with train_nvs.py's steps. Scored by PSNR and SSIM of the final grid's held-out pairs.
conditions (the paper's condition-token ablation, its "upstream-downstream discrepancy"): the default
I2I run with --condition cls, patch (every seed) and all (seed 0 only), with a grid every 100
steps: the object agreement (the mean of colour, shape, size and position agreement; the background
is near 1.0 from the first grid on) against steps is the upstream; then train_t2i.py's default
fine-tuning from each, scored as t2i-data, is the downstream.
repa: the default I2I run with --repa-weight 0.5 against without (conditions' CLS runs), a grid every
100 steps: the first grid step whose object agreement reaches the run without REPA's final one, per
seed (">1000" when none does).
LPIPS needs pretrained AlexNet/VGG weights, which this machine cannot download: with them, score a
run's final grid, whose views train_i2i.sample_grid saves beside it, with `python evaluate.py nvs
--pred OUT/RUN/samples/step_0000200.samples.npz --target OUT/RUN/samples/step_0000200.references.npz
--lpips-linear alex.pth --lpips-backbone alexnet.pth`.

The I2I prior of the first two tables is the default run (`python train_i2i.py`, seed 0), one for
every seed. A seed is the fine-tuning runs' --seed (and the I2I runs' own in the last two): the
draw of the data and of its held-out items, the new weights, the noise and timesteps. Every run
lives in OUT/<run>/ and runs with --resume, so the command run again after a kill goes on from each
run's last checkpoint; a run that OUT/results.jsonl already holds, with the same command, is read
back, not retrained. OUT/results.jsonl gets a line per finished run, and
OUT/<table>.md the table (mean +- sample std over the seeds), rewritten after every run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
I2I_PRIOR = "i2i"  # OUT/i2i: the default I2I run
PRIOR_EXPORT = os.path.join("{out}", I2I_PRIOR, "ema.safetensors")  # train_run fills in {out}
# Set here for each run: given after --, they would quietly change what a table compares.
OWN_ARGS = ("--out", "--seed", "--init", "--n-captions", "--data", "--resume")
# A run from a prior takes the prior's size (train_i2i.resolve_init): these go to runs from scratch only.
SIZE_ARGS = ("--depth", "--hidden-size", "--num-heads")
CAPTION_METRICS = ("caption_background", "caption_color", "caption_shape", "caption_size", "caption_position",
                   "attribute_distance")
OBJECT_AGREEMENT = ("agreement_color", "agreement_shape", "agreement_size", "agreement_position")
CURVE_EVERY = 100  # the I2I runs' --sample-every in conditions and repa
REPA_WEIGHT = "0.5"  # REPA's lambda


def prior(seed, captions):
    """{run name: (script, args)}: the default I2I run, the prior of t2i-data and nvs-priors."""
    return {I2I_PRIOR: ("train_i2i.py", ["--seed", "0"])}


def t2i_runs(seed, captions):
    """{run name: (script, args)} of t2i-data's two arms at `seed`."""
    data = ["--data", f"shapes:{captions}", "--seed", str(seed)]
    return {f"t2i_prior_tenth_seed{seed}": ("train_t2i.py", [*data, "--init", PRIOR_EXPORT,
                                                               "--n-captions", str(captions // 10)]),
            f"t2i_scratch_all_seed{seed}": ("train_t2i.py", [*data, "--init", "scratch"])}


def nvs_needs(seed, captions):
    """The I2I prior and t2i-data's from-scratch arm at `seed`: the T2I prior of nvs-priors."""
    t2i_scratch = {name: run for name, run in t2i_runs(seed, captions).items() if name.startswith("t2i_scratch")}
    return {**prior(seed, captions), **t2i_scratch}


def i2i_curve_run(name, seed, *flags):
    """{name: the default I2I run at `seed` with `flags`, a grid every CURVE_EVERY steps}."""
    return {name: ("train_i2i.py", ["--seed", str(seed), "--sample-every", str(CURVE_EVERY), *flags])}


def condition_i2i_runs(seed, captions):
    """conditions' I2I runs at `seed`: CLS and patch tokens; all tokens at seed 0 only."""
    arms = ("cls", "patch", "all") if seed == 0 else ("cls", "patch")
    return {name: run for arm in arms
            for name, run in i2i_curve_run(f"i2i_{arm}_seed{seed}", seed, "--condition", arm).items()}


def condition_t2i_runs(seed, captions):
    """conditions' T2I runs at `seed`: train_t2i.py's default fine-tuning from each I2I run."""
    return {f"t2i_from_{name.removeprefix('i2i_')}": ("train_t2i.py", [
                "--data", f"shapes:{captions}", "--seed", str(seed), "--init",
                os.path.join("{out}", name, "ema.safetensors")]) for name in condition_i2i_runs(seed, captions)}


def repa_runs(seed, captions):
    return i2i_curve_run(f"i2i_repa_seed{seed}", seed, "--repa-weight", REPA_WEIGHT)


def repa_baseline(seed, captions):
    return i2i_curve_run(f"i2i_cls_seed{seed}", seed, "--condition", "cls")


def nvs_runs(seed, captions):
    """{run name: (script, args)} of nvs-priors' three arms at `seed`."""
    t2i_scratch = os.path.join("{out}", f"t2i_scratch_all_seed{seed}", "ema.safetensors")
    return {f"nvs_{arm}_seed{seed}": ("train_nvs.py", ["--seed", str(seed), "--init", init])
            for arm, init in (("none", "scratch"), ("t2i", t2i_scratch), ("i2i", PRIOR_EXPORT))}


CONDITION_ARMS = {"cls": "CLS (Lumos)", "patch": "patch tokens", "all": "all tokens"}
TABLES = {
    "t2i-data": {"runs": t2i_runs, "metrics": CAPTION_METRICS, "needs": prior,
                 "arms": {"t2i_prior_tenth": "I2I prior, N/10 captions", "t2i_scratch_all": "from scratch, N captions"}},
    "nvs-priors": {"runs": nvs_runs, "metrics": ("psnr", "ssim"), "needs": nvs_needs,
                   "arms": {"nvs_none": "no prior", "nvs_t2i": "T2I prior (from scratch, N captions)",
                            "nvs_i2i": "I2I prior"}},
    "conditions": {"runs": condition_t2i_runs, "metrics": CAPTION_METRICS, "needs": condition_i2i_runs,
                   "arms": {f"t2i_from_{arm}": label for arm, label in CONDITION_ARMS.items()},
                   "curves": {f"i2i_{arm}": label for arm, label in CONDITION_ARMS.items()}},
    "repa": {"runs": repa_runs, "metrics": (), "needs": repa_baseline,
             "curves": {"i2i_cls": "without REPA (the default)", "i2i_repa": f"REPA, weight {REPA_WEIGHT}"}},
}


#################################################################################
#                                  The runs                                     #
#################################################################################

def read_results(out):
    """{run name: its latest line} of OUT/results.jsonl."""
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [json.loads(text) for text in f if text.strip()]
    return {line["run"]: line for line in lines}  # a later line of a run (rerun otherwise) wins


def grid_evaluations(run_dir):
    """The grid-evaluation lines of a run's metrics.jsonl (the loss lines hold "loss"), in step order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(text) for text in f if text.strip()]
    evaluations = [line for line in lines if "loss" not in line]
    if not evaluations:
        raise RuntimeError(f"{path} holds no grid evaluation: the runs need --sample-every > 0")
    return sorted({line["step"]: line for line in evaluations}.values(), key=lambda line: line["step"])


def without_size_args(extra):
    """`extra` without SIZE_ARGS and their values."""
    kept, skip_value = [], False
    for arg in extra:
        if skip_value or arg.split("=")[0] in SIZE_ARGS:
            skip_value = not skip_value and "=" not in arg
            continue
        kept.append(arg)
    return kept


def train_run(out, name, script, args, extra):
    """Train run `name` unless results.jsonl has it with this command (a subprocess: each run starts
    in a fresh process, as it is documented), and append its final evaluation. -> that line."""
    from_prior = "--init" in args and args[args.index("--init") + 1] != "scratch"
    extra = without_size_args(extra) if from_prior else extra
    command = [script, *[arg.format(out=out) for arg in args], *extra, "--out", os.path.join(out, name), "--resume"]
    done = read_results(out).get(name)
    if done is not None and done["command"] == command:
        return done
    print(f"\n== {name}: python {' '.join(command)}", flush=True)
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, os.path.join(HERE, script), *command[1:]])
    if finished.returncode != 0:
        raise RuntimeError(f"run {name} failed with exit status {finished.returncode}: python {' '.join(command)}")
    evaluations = grid_evaluations(os.path.join(out, name))  # a resumed run's repeated step: its last line
    line = {"run": name, "command": command, "wall_s": round(time.perf_counter() - start, 1), **evaluations[-1],
            "evaluations": evaluations}
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


#################################################################################
#                                  The table                                    #
#################################################################################

def mean_std(values):
    """'mean +- sample std' of the seeds' values (the std needs two seeds)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def object_agreement(evaluation):
    """The mean of an I2I grid's colour, shape, size and position agreement."""
    return float(np.mean([evaluation[name] for name in OBJECT_AGREEMENT]))


def finished(results, arm, seeds):
    return [results[f"{arm}_seed{seed}"] for seed in seeds if f"{arm}_seed{seed}" in results]


def metrics_markdown(spec, results, seeds):
    """A row per arm (its finished seeds), a column per metric of its final grid."""
    rows = [f"| arm | seeds | {' | '.join(spec['metrics'])} |", "|---" * (len(spec["metrics"]) + 2) + "|"]
    for arm, label in spec["arms"].items():
        lines = finished(results, arm, seeds)
        if lines:
            cells = [mean_std([line[metric] for line in lines]) for metric in spec["metrics"]]
            rows.append(f"| {label} | {len(lines)} | {' | '.join(cells)} |")
    return rows


def curves_markdown(spec, results, seeds):
    """I2I object agreement against steps: a row per arm (its finished seeds), a column per grid step."""
    lines = {arm: finished(results, arm, seeds) for arm in spec["curves"]}
    steps = sorted({e["step"] for arm_lines in lines.values() for line in arm_lines for e in line["evaluations"]})
    rows = [f"| I2I object agreement at step | seeds | {' | '.join(map(str, steps))} |", "|---" * (len(steps) + 2) + "|"]
    for arm, label in spec["curves"].items():
        if lines[arm]:
            cells = [mean_std([object_agreement(e) for line in lines[arm] for e in line["evaluations"] if e["step"] == step])
                     for step in steps]
            rows.append(f"| {label} | {len(lines[arm])} | {' | '.join(cells)} |")
    return rows


def steps_to_reach(line, target):
    """The first grid step whose object agreement is at least `target`; '>' the last step if none."""
    steps = [e["step"] for e in line["evaluations"] if object_agreement(e) >= target]
    return str(steps[0]) if steps else f">{line['evaluations'][-1]['step']}"


def repa_markdown(results, seeds):
    """Per seed: the final object agreement without REPA, and the steps each run takes to reach it."""
    rows = ["| seed | final object agreement without REPA | steps to reach it without REPA | ... with REPA | "
            "final object agreement with REPA |", "|---" * 5 + "|"]
    for seed in seeds:
        base, repa = results.get(f"i2i_cls_seed{seed}"), results.get(f"i2i_repa_seed{seed}")
        if base is not None and repa is not None:
            target = object_agreement(base)
            rows.append(f"| {seed} | {target:.3f} | {steps_to_reach(base, target)} | {steps_to_reach(repa, target)} | "
                        f"{object_agreement(repa):.3f} |")
    return rows


def table_markdown(table, results, seeds):
    """The table as markdown: its arms' final metrics, its I2I curves, REPA's steps to the target."""
    spec = TABLES[table]
    parts = [metrics_markdown(spec, results, seeds)] if spec["metrics"] else []
    parts += [curves_markdown(spec, results, seeds)] if "curves" in spec else []
    parts += [repa_markdown(results, seeds)] if table == "repa" else []
    return "\n\n".join("\n".join(rows) for rows in parts) + "\n"


def run_table(table, out, seeds, captions, extra):
    """Train what `table` needs (the I2I prior, its dependencies, its arms) seed by seed; rewrite
    OUT/<table>.md after every run. -> the markdown."""
    spec = TABLES[table]
    os.makedirs(out, exist_ok=True)
    for seed in seeds:
        runs = {**spec["needs"](seed, captions), **spec["runs"](seed, captions)}
        for name, (script, args) in runs.items():
            train_run(out, name, script, args, extra)
            markdown = table_markdown(table, read_results(out), seeds)
            with open(os.path.join(out, f"{table}.md"), "w") as f:
                f.write(markdown)
    return markdown


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("table", choices=list(TABLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the fine-tuning runs' --seed")
    parser.add_argument("--captions", type=int, default=20000, help="N: `shapes:N` captioned images for T2I")
    parser.add_argument("--out", default="runs/experiments", help="the runs, results.jsonl and the tables")
    args = parser.parse_args(argv[: len(argv) - len(extra) - ("--" in argv)])
    given = [arg for arg in extra if arg.split("=")[0] in OWN_ARGS]
    if given:
        parser.error(f"{given[0]} after -- is set by the table for each run; pass the others only")
    if args.captions < 10:
        parser.error(f"--captions {args.captions}: N/10 captions must be at least one")
    try:
        markdown = run_table(args.table, args.out, args.seeds, args.captions, extra)
    except RuntimeError as error:
        print(f"experiments.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"\n{args.table} ({os.path.join(args.out, args.table + '.md')}):\n{markdown}")


if __name__ == "__main__":
    main()
