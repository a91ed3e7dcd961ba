"""Error reporting for ``train.py``: one clear line for bad input, a FAILED marker in the run
directory (so a failed run never looks like a finished one), non-zero exit."""

from __future__ import annotations

import os
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OmegaConfBaseException)


def _user_error(e: BaseException) -> BaseException | None:
    """The user-facing cause of ``e`` (hydra wraps instantiate errors), if any."""
    seen = e
    while seen is not None:
        if isinstance(seen, USER_ERRORS) and type(seen).__name__ != "InstantiationException":
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_or_report(cfg: DictConfig):
    from qtrain.run import train

    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.recipe_name = hc.runtime.choices.get("recipe")
    run_dir = cfg.paths.output_dir
    try:
        summary = train(cfg)
    except Exception as e:  # re-raised unless it is bad user input
        cause = _user_error(e)
        msg = f"{type(cause or e).__name__}: {cause or e}".splitlines()[0]
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "FAILED"), "w") as f:
            f.write(msg + "\n")
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    q = summary.get("quant_metric")
    return q if q is not None else summary.get("fp32_metric")
