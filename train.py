"""qtrain entry point: ``python train.py [recipe=<name>] [overrides]`` (``--help`` lists recipes)."""

import os
import sys

import hydra
from omegaconf import DictConfig

os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from qtrain.cli import run_or_report

    return run_or_report(cfg)


if __name__ == "__main__":
    from qtrain.config_schema import exit_on_bad_argv

    exit_on_bad_argv(sys.argv[1:])  # an unknown recipe / group option / key: "did you mean"
    sys.exit(main())
