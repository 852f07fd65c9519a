"""``bloodcell train``: one model from a YAML config, ``--set`` overrides and ``--resume``;
under torchrun (``torchrun --nproc_per_node=N -m bloodcell_lib train ...``) with DDP.

Exit codes: 0 trained; 2 a bad parameter, config, checkpoint or resume; 130 interrupted
(the run folder keeps the last completed epoch).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

# train first: it sets OMP_WAIT_POLICY, which only works before torch is imported
from bloodcell_lib.training import train
from bloodcell_lib.training.checkpointing import ResumeError
from bloodcell_lib.core import distributed as D
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.training.config import ConfigError, load_config, make_config
from bloodcell_lib.training.signals import stop_signals_interrupt


def parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not a YAML literal: {err}") from err
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell train",
        description="Train a model from a YAML config. Under torchrun "
                    "(torchrun --nproc_per_node=N -m bloodcell_lib train --config X.yaml) it trains with DDP.")
    parser.add_argument("--config", help="experiment YAML (keys are TrainConfig fields)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/checkpoint_last.pt (fresh start if there is none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field; VALUE is a YAML literal (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only epoch lines")
    return parser


def _error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = parse_set(args.overrides)
        if args.resume:
            overrides["resume"] = True
        cfg = load_config(args.config, **overrides) if args.config else make_config(overrides)
    except ConfigError as err:
        return _error(err)
    try:
        with stop_signals_interrupt():
            train.fit_experiment(cfg, progress=not args.no_progress)
    except (ConfigError, ResumeError, CheckpointError) as err:
        return _error(err)
    except KeyboardInterrupt:
        print(f"rank {D.get_rank()}: interrupted; {cfg.run_dir} keeps the last completed epoch "
              "(continue with --resume)", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        if D.get_world_size() > 1:
            print(f"rank {D.get_rank()}: training failed ({type(err).__name__}: {err}). Another process "
                  f"may have died; {cfg.run_dir} keeps the last completed epoch (continue with --resume).",
                  file=sys.stderr, flush=True)
        raise
    finally:
        D.cleanup()
    return 0
