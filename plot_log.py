"""Training curves of a main_dino run, drawn from its log.txt: `python plot_log.py OUTPUT_DIR`.

Draws one panel per logged quantity that is present (loss, lr, wd, teacher entropy and KL to
uniform with ln(out_dim) marked, skipped images, k-NN top-1), so the reference's log.txt
(train_loss, train_lr, train_wd, epoch) works too. main_dino.py redraws
OUTPUT_DIR/curves.png after every epoch with the same code, and sends the same scalars to
TensorBoard with --tensorboard_dir.
"""
import argparse
import json
import math
import os
from typing import List, Optional, Sequence

from matplotlib.figure import Figure

import utils

# (title, log keys drawn in the panel, whether ln(out_dim) is marked)
PANELS = [
    ("loss", ("train_loss",), True),
    ("learning rate", ("train_lr",), False),
    ("weight decay", ("train_wd",), False),
    ("teacher outputs (nats)", ("train_teacher_entropy", "train_teacher_kl"), True),
    ("skipped images", ("train_skipped_images",), False),
    ("k-NN top-1 (%)", ("knn_top1",), False),
]
LABELS = {"train_teacher_entropy": "entropy", "train_teacher_kl": "KL(batch mean || uniform)"}


def read_log(path: str) -> List[dict]:
    """The JSON records of a log.txt, one per non-empty line; an InputError names a bad line."""
    if not os.path.isfile(path):
        raise utils.InputError(f"{path!r} is not a file: give the output_dir of a main_dino run "
                               "(it holds log.txt)")
    records = []
    with open(path) as log_file:
        for number, line in enumerate(log_file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise utils.InputError(f"{path}:{number} is not a JSON line ({error})") from error
    if not records:
        raise utils.InputError(f"{path!r} holds no epoch yet")
    return records


def plot_curves(records: Sequence[dict], out_dim: Optional[int] = None) -> Figure:
    """A figure with one panel per quantity present in `records` (x axis: epochs)."""
    panels = [panel for panel in PANELS if any(key in r for r in records for key in panel[1])]
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100)
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax, (title, keys, marks_uniform) in zip(axes, panels):
        for key in keys:
            points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records)
                      if r.get(key) is not None]
            epochs, values = zip(*points) if points else ((), ())
            ax.plot(epochs, values, marker="o", markersize=3, label=LABELS.get(key, key))
        if marks_uniform and out_dim:
            ax.axhline(math.log(out_dim), color="grey", linestyle="--",
                       label=f"ln(out_dim) = {math.log(out_dim):.2f}")
        if len(keys) > 1 or (marks_uniform and out_dim):
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def save_curves(log_path: str, output_path: str, out_dim: Optional[int] = None) -> None:
    """Draw log.txt's curves into `output_path` (written atomically: a reader never sees half
    a PNG)."""
    fig = plot_curves(read_log(log_path), out_dim)
    tmp_path = f"{output_path}.tmp{os.getpid()}.png"
    fig.savefig(tmp_path)
    os.replace(tmp_path, output_path)


def out_dim_of_run(output_dir: str) -> Optional[int]:
    """--out_dim from the run's checkpoint.pth when there is one (memory-mapped, so cheap)."""
    path = os.path.join(output_dir, "checkpoint.pth")
    if not os.path.isfile(path):
        return None
    args = utils.load_checkpoint_file(path, mmap=True).get("args")
    return getattr(args, "out_dim", None)


def open_tensorboard(log_dir: str):
    """A TensorBoard SummaryWriter on `log_dir` on the main process, None elsewhere."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise utils.InputError(f"--tensorboard_dir needs the tensorboard package, which is not "
                               f"installed ({error}): pip install tensorboard, or drop the "
                               "flag") from error
    return SummaryWriter(log_dir) if utils.is_main_process() else None


def write_tensorboard(writer, record: dict) -> None:
    """One epoch's log record as TensorBoard scalars at step = epoch (nothing without a
    writer)."""
    if writer is None:
        return
    for key, value in record.items():
        if key != "epoch" and value is not None:
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Training curves of a main_dino run")
    parser.add_argument("output_dir", help="A main_dino --output_dir (holding log.txt).")
    parser.add_argument("--out_dim", default=None, type=int,
                        help="Marks ln(out_dim) on the loss and teacher panels (default: read "
                             "from the run's checkpoint.pth, if there is one).")
    parser.add_argument("--output", default=None,
                        help="Where to write the PNG (default: OUTPUT_DIR/curves.png).")
    return parser


def main(args: argparse.Namespace) -> None:
    out_dim = args.out_dim if args.out_dim is not None else out_dim_of_run(args.output_dir)
    output = args.output or os.path.join(args.output_dir, "curves.png")
    save_curves(os.path.join(args.output_dir, "log.txt"), output, out_dim)
    print(f"{output} saved.")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
