"""The paper's comparisons in miniature: each README table is one subcommand that trains its arms with
train_i2i.py, train_t2i.py and train_nvs.py, seed by seed, and writes each finished run's numbers as
they come.

    python experiments.py t2i-data      # T2I from the I2I prior on N/10 captions vs from scratch on N
    python experiments.py nvs-priors    # NVS from no prior, from the T2I prior, from the I2I prior
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
LPIPS needs pretrained AlexNet/VGG weights, which this machine cannot download: with them, score a
run's final grid, whose views train_i2i.sample_grid saves beside it, with `python evaluate.py nvs
--pred OUT/RUN/samples/step_0000200.samples.npz --target OUT/RUN/samples/step_0000200.references.npz
--lpips-linear alex.pth --lpips-backbone alexnet.pth`.

The I2I prior is the default run (`python train_i2i.py`, seed 0), one for every seed. A seed is the
fine-tuning runs' --seed: the draw of the data and of its held-out items, the new weights, the noise
and timesteps. Every run lives in OUT/<run>/ and runs with --resume, so the command run again after a
kill goes on from each run's last checkpoint; a run that OUT/results.jsonl already holds, with the
same command, is read back, not retrained. OUT/results.jsonl gets a line per finished run, and
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


def t2i_runs(seed, captions):
    """{run name: (script, args)} of t2i-data's two arms at `seed`."""
    data = ["--data", f"shapes:{captions}", "--seed", str(seed)]
    return {f"t2i_prior_tenth_seed{seed}": ("train_t2i.py", [*data, "--init", PRIOR_EXPORT,
                                                               "--n-captions", str(captions // 10)]),
            f"t2i_scratch_all_seed{seed}": ("train_t2i.py", [*data, "--init", "scratch"])}


def t2i_baseline(seed, captions):
    """{run name: (script, args)} of t2i-data's from-scratch arm at `seed`: the T2I prior of nvs-priors."""
    return {name: run for name, run in t2i_runs(seed, captions).items() if name.startswith("t2i_scratch")}


def nvs_runs(seed, captions):
    """{run name: (script, args)} of nvs-priors' three arms at `seed`."""
    t2i_scratch = os.path.join("{out}", f"t2i_scratch_all_seed{seed}", "ema.safetensors")
    return {f"nvs_{arm}_seed{seed}": ("train_nvs.py", ["--seed", str(seed), "--init", init])
            for arm, init in (("none", "scratch"), ("t2i", t2i_scratch), ("i2i", PRIOR_EXPORT))}


TABLES = {
    "t2i-data": {"runs": t2i_runs, "metrics": CAPTION_METRICS, "needs": lambda seed, captions: {},
                 "arms": {"t2i_prior_tenth": "I2I prior, N/10 captions", "t2i_scratch_all": "from scratch, N captions"}},
    "nvs-priors": {"runs": nvs_runs, "metrics": ("psnr", "ssim"), "needs": t2i_baseline,
                   "arms": {"nvs_none": "no prior", "nvs_t2i": "T2I prior (from scratch, N captions)",
                            "nvs_i2i": "I2I prior"}},
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


def last_evaluation(run_dir):
    """The last grid-evaluation line of a run's metrics.jsonl (the loss lines hold "loss")."""
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(text) for text in f if text.strip()]
    evaluations = [line for line in lines if "loss" not in line]
    if not evaluations:
        raise RuntimeError(f"{path} holds no grid evaluation: the runs need --sample-every > 0")
    return evaluations[-1]


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
    line = {"run": name, "command": command, "wall_s": round(time.perf_counter() - start, 1),
            **last_evaluation(os.path.join(out, name))}
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


def table_markdown(table, results, seeds):
    """The table as markdown: a row per arm (its finished seeds), a column per metric."""
    spec = TABLES[table]
    rows = [f"| arm | seeds | {' | '.join(spec['metrics'])} |", "|---" * (len(spec["metrics"]) + 2) + "|"]
    for arm, label in spec["arms"].items():
        lines = [results[f"{arm}_seed{seed}"] for seed in seeds if f"{arm}_seed{seed}" in results]
        if lines:
            cells = [mean_std([line[metric] for line in lines]) for metric in spec["metrics"]]
            rows.append(f"| {label} | {len(lines)} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def run_table(table, out, seeds, captions, extra):
    """Train what `table` needs (the I2I prior, its dependencies, its arms) seed by seed; rewrite
    OUT/<table>.md after every run. -> the markdown."""
    spec = TABLES[table]
    os.makedirs(out, exist_ok=True)
    train_run(out, I2I_PRIOR, "train_i2i.py", ["--seed", "0"], extra)
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
