"""Training speed: pairs per second of our training loop against the 2019 loop, in one run.

Measures, on the same device, threads, data, CNN and loss: the 2019 loop
(``tutorial_utils.pipeline_2019.train_features_2019``: one pair at a time, the CNN twice per pair, the
unfold correlation layer) and ours (``tutorial_utils.train.train_features``: the CNN once per
slice of a step and all ordered pairs among the step's slices) with the 2019 settings (the
like-for-like comparison, the headline speed-up), with the 2019 settings and two slices per
step, and with our default settings. Each loop runs once to warm up, then ``--repeats``
times; the median pairs/s is reported. Discussed in notebook 04 (``04_training.ipynb``).

    python -m benchmarks.training --json benchmark-results/training.json
    python -m benchmarks.training --pairs 24 --pairs-2019 4 --repeats 1

Measurement rules: :mod:`benchmarks.timing`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

# tutorial_utils: every name this script uses, in one block
from tutorial_utils.checks import argument_type, check_int
from tutorial_utils.data import load_dataset
from tutorial_utils.pipeline_2019 import train_features_2019, train_features_settings_2019
from tutorial_utils.train import DEFAULTS, train_features
from tutorial_utils.training import device_name

from .timing import Benchmark, machine_info, positive_int, resolve_device

__all__ = ["BENCHMARK", "build_parser", "format_training_table", "main", "run_training_benchmark"]


# --------------------------------------------------------------------------- measuring


def _measure_loop(name: str, run: Callable[[int], tuple], num_pairs: int, cnn_passes: float, step_size: int,
                  repeats: int, progress: bool) -> dict:
    """One row: ``run(step_size)`` once to warm up, then ``run(num_pairs)`` ``repeats`` times.

    ``run(p)`` trains for ``p`` pairs and returns ``(model, history)``; the row holds the
    median of ``history.pairs_per_second``.
    """
    if progress:
        print(f"  {name} ...", file=sys.stderr, flush=True)
    run(step_size)  # warm-up: one step
    speeds = []
    for _ in range(repeats):
        _, history = run(num_pairs)
        speeds.append(history.pairs_per_second)
    speed = statistics.median(speeds)
    return {"loop": name, "images_per_step": None if cnn_passes == 2 else round(1 + 1 / cnn_passes),
            "pairs": history.pairs, "repeats": repeats, "pairs_per_second": speed,
            "pairs_per_second_all": speeds, "seconds_per_pair": 1.0 / speed, "cnn_passes_per_pair": cnn_passes}


def _training_loops(dataset, n: int, pairs: int, pairs_2019: int, common: dict) -> list[tuple]:
    """The four loops, in the order they run: ``(name, run, num_pairs, cnn_passes, step_size)``."""
    like_2019 = train_features_settings_2019()
    return [
        ("2019 loop", lambda p: train_features_2019(dataset, num_pairs=p, **common), pairs_2019, 2.0, 4),
        (f"ours, 2019 settings, n={n}",
         lambda p: train_features(dataset, num_pairs=p, images_per_step=n, **like_2019, **common),
         pairs, 1.0 / (n - 1), n * (n - 1)),
        ("ours, 2019 settings, n=2",
         lambda p: train_features(dataset, num_pairs=p, images_per_step=2, **like_2019, **common),
         pairs, 1.0, 2),
        (f"ours, default settings, n={n}",
         lambda p: train_features(dataset, num_pairs=p, images_per_step=n, **common),
         pairs, 1.0 / (n - 1), n * (n - 1)),
    ]


def run_training_benchmark(
    pairs: int = 240,
    pairs_2019: int = 24,
    repeats: int = 2,
    images_per_step: int | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    source: str = "synthetic",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Training pairs per second: our loop against the 2019 loop, in the same run on the same device.

    The 2019 loop is :func:`tutorial_utils.pipeline_2019.train_features_2019`: one pair at a time, the
    CNN twice per pair, the unfold correlation layer, the slides' pooling regulariser, the
    unfolded label loss, Adam with the gradient accumulated over 4 pairs. Ours is
    :func:`tutorial_utils.train.train_features`: the CNN once per slice of a step and all
    ordered pairs among the step's slices, the fast correlation and regulariser, the shared
    label warp, chunked differentiation. Three rows of ours:

    * ``2019 settings``: the 2019 kernels (min-pool 3, two average pools 5, one mean-field
      round of three pools 5), ``alpha`` 10, zero border and no pre-alignment, read from
      :data:`tutorial_utils.pipeline_2019.TRAIN_DEFAULTS_2019` (``train_features_settings_2019``), so
      the same work per pair: the like-for-like comparison (the headline ``speedup``). Our
      loop still divides the costs by their mean and min-pools first (its own choices, no
      extra work), so its losses are not the 2019 loop's;
    * ``2019 settings, n=2``: the same with two slices per step (one CNN pass per pair), the
      speed-up that does not come from sharing the CNN between pairs;
    * ``default settings``: what ``train_features`` does by default (the regularisation of
      ``register_images``, which may be heavier, e.g. two mean-field rounds).

    Same CNN, loss, data, device and number of threads (``threads``; default 1 on the CPU, as
    both loops default to), denormals flushed in both. Each loop runs once to warm up, then
    ``repeats`` times; the median pairs/s is reported.

    Returns:
        a JSON-serialisable dict: ``machine``, ``settings``, ``rows`` (one per loop with
        ``pairs_per_second``, ``seconds_per_pair``, ``cnn_passes_per_pair``, ``speedup``) and
        ``speedup`` (ours with the 2019 settings over the 2019 loop).
    """
    device = resolve_device(device)
    dataset = load_dataset(source=source, seed=seed, verbose=False)
    n = images_per_step or DEFAULTS["images_per_step"]
    common = dict(seed=seed, device=device, progress=False, threads=threads)
    rows = [_measure_loop(*loop, repeats=repeats, progress=progress)
            for loop in _training_loops(dataset, n, pairs, pairs_2019, common)]
    base = rows[0]["pairs_per_second"]
    for row in rows:
        row["speedup"] = row["pairs_per_second"] / base
    used_threads = threads if threads is not None else (1 if device.type == "cpu" else torch.get_num_threads())
    return {
        "benchmark": "training",
        "machine": {**machine_info(device), "training_threads": used_threads},
        "settings": {"pairs": pairs, "pairs_2019": pairs_2019, "repeats": repeats, "source": dataset.source,
                     "image_size": list(dataset.image_size), "num_labels": dataset.num_labels,
                     "disp_range": DEFAULTS["disp_range"], "images_per_step": n, "seed": seed,
                     "threads": used_threads},
        "rows": rows,
        "speedup": rows[1]["speedup"],
    }


# --------------------------------------------------------------------------- reading the results


def format_training_table(result: dict) -> str:
    """The training benchmark as a plain-text table."""
    machine, settings = result["machine"], result["settings"]
    lines = [f"training loop, {settings['source']} slices {settings['image_size'][0]}x{settings['image_size'][1]}, "
             f"{settings['num_labels']} labels, D={settings['disp_range']} on {machine['device']} "
             f"({machine.get('gpu') or machine['processor']}, {settings['threads']} training threads, "
             f"torch {machine['torch']}, load average {machine.get('load_average_1min')})"]
    header = f"{'loop':>32s} {'pairs':>6s} {'pairs/s':>8s} {'s/pair':>8s} {'CNN/pair':>8s} {'speed-up':>8s}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['loop']:>32s} {row['pairs']:>6d} {row['pairs_per_second']:>8.2f} "
                     f"{row['seconds_per_pair']:>8.3f} {row['cnn_passes_per_pair']:>8.2f} {row['speedup']:>7.1f}x")
    lines.append(f"like for like (2019 settings), our loop trains {result['speedup']:.1f}x as many pairs per "
                 f"second as the 2019 loop (median of {settings['repeats']} runs each, after a warm-up)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=positive_int, default=240, help="pairs per run of our loop (default 240)")
    parser.add_argument("--pairs-2019", type=positive_int, default=24,
                        help="pairs per run of the 2019 loop (default 24)")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="timed runs per loop, median reported (default 2)")
    parser.add_argument("--images-per-step", type=argument_type(check_int, minimum=2), default=None,
                        help="our loop's slices per step (default: the training default)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--source", choices=["synthetic", "tcia", "auto"], default="synthetic",
                        help="the slices to train on (default synthetic)")


def _run(args: argparse.Namespace) -> dict:
    return run_training_benchmark(pairs=args.pairs, pairs_2019=args.pairs_2019, repeats=args.repeats,
                                  images_per_step=args.images_per_step, device=args.device,
                                  threads=args.threads, source=args.source, progress=True)


BENCHMARK = Benchmark(
    name="training",
    module="training",
    help="training pairs per second: our loop (tutorial_utils.train) vs the 2019 loop",
    add_arguments=_add_arguments,
    run=_run,
    format=format_training_table,
)

build_parser, main = BENCHMARK.build_parser, BENCHMARK.main  # the command line, see benchmarks.timing


if __name__ == "__main__":
    sys.exit(main())
