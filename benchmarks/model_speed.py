"""Model speed benchmark: training-step and prediction throughput of model architectures.

    .venv/bin/python benchmarks/model_speed.py [--models efficientnet_lite0 efficientnet_lite1 ...]
        [--image-size 128] [--batch-size 32] [--steps 10] [--repeats 3] [--out benchmarks/results/model_speed.json]

Model compute alone, on random batches (no data loading, no augmentation): what choosing a
larger architecture costs on this machine. Every layer trains (AdamW), channels_last, as
``train.fit`` runs a model without ``freeze``. The models run in turn, ``--repeats`` rounds,
so a warming or busy machine does not favour one of them; each keeps its best round.
A benchmark, not a test: it prints a table and writes JSON, and asserts nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/model_speed.py` without an installed package
    sys.path.insert(0, str(ROOT))

# train first: it sets the thread policy before torch loads, as for any training run.
from bloodcell_lib.training import train as T  # noqa: E402,F401
from bloodcell_lib.modeling import models  # noqa: E402
from bloodcell_lib.core import provenance
from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402

import torch  # noqa: E402

DEFAULT_MODELS = models.EFFICIENTNET_LITES


def _timed(step, steps: int) -> float:
    """Seconds per call of ``step`` over ``steps`` calls, after one untimed call."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(name: str, *, image_size: int, batch_size: int, steps: int, num_classes: int = 4) -> dict[str, Any]:
    """One round for one model: training and prediction images per second."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    model = models.create_model(name, num_classes, pretrained=False).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def predict_step() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train_seconds = _timed(train_step, steps)
    model.eval()
    predict_seconds = _timed(predict_step, steps)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "train_images_per_second": batch_size / train_seconds,
            "predict_images_per_second": batch_size / predict_seconds}


def run(names: list[str], *, image_size: int, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            rounds[name].append(measure(name, image_size=image_size, batch_size=batch_size, steps=steps))
    best = {name: {"parameters": found[0]["parameters"],
                   "train_images_per_second": max(r["train_images_per_second"] for r in found),
                   "predict_images_per_second": max(r["predict_images_per_second"] for r in found)}
            for name, found in rounds.items()}
    return {"settings": {"models": names, "image_size": image_size, "batch_size": batch_size,
                         "steps": steps, "repeats": repeats},
            "machine": {**provenance.machine_info(), "torch": torch.__version__},
            "rounds": rounds, "best": best,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| model | parameters | train img/s | predict img/s |", "|---|---:|---:|---:|"]
    for name, best in result["best"].items():
        lines.append(f"| `{name}` | {best['parameters'] / 1e6:.1f} M | {best['train_images_per_second']:.0f} | "
                     f"{best['predict_images_per_second']:.0f} |")
    s = result["settings"]
    lines.append(f"\n{s['image_size']} px, batch {s['batch_size']}, every layer trained (AdamW), channels_last, "
                 f"best of {s['repeats']} round(s) of {s['steps']} steps; {result['machine']['processor']}, "
                 f"{result['machine']['torch_threads']} torch threads.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=models.available_models(),
                        metavar="NAME", help="any models.available_models() name (default: the EfficientNet-Lites)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all models; each keeps its best")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "model_speed.json")
    args = parser.parse_args(argv)
    for name, value in (("--image-size", args.image_size), ("--batch-size", args.batch_size),
                        ("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be >= 1 (got {value})")
    result = run(args.models, image_size=args.image_size, batch_size=args.batch_size,
                 steps=args.steps, repeats=args.repeats)
    table = format_table(result)
    atomic_write_json(args.out, {**result, "table_markdown": table})
    print(table)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
