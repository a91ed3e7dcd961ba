"""Config schemas: a wrong type, an out-of-range value or an unknown enum value in the
composed config fails before torch is imported, as one line naming the key, the value and
the allowed values (:class:`qtrain.errors.ConfigError`, exit status 2).

Two checks, both pure Python (Hydra + OmegaConf; no torch):

* :func:`check_argv` -- ``train.py`` runs it before Hydra composes: a group option that does
  not exist (``recipe=pact_w4a4_resnet20_cifar``) and a key that does not exist
  (``quant.bitz=4``) name the closest existing ones ("did you mean"), instead of Hydra's
  composition error.
* :func:`check` -- :func:`qtrain.validation.check_config` runs it on the composed config, which
  :mod:`qtrain.cli` calls before importing the training code: every node of the ``quant``,
  ``data`` and ``trainer`` groups and of ``extra_callbacks`` whose ``_target_`` has a schema
  (qtrain/config_schema/{quant,data,trainer}.py) and the top-level keys (``top.py``).

Why not Hydra's ConfigStore as the yaml files' base schema: Hydra's composition errors exit 1
without the allowed values, and each conf/*.yaml would have to name its schema in its
defaults list; the same dataclasses, keyed by ``_target_``, check the composed config instead,
including what a recipe or the command line changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from qtrain.config_schema import data, quant, terminal, trainer  # noqa: F401 (register the schemas)
from qtrain.config_schema.core import (
    SCHEMAS,
    SKIP,
    Node,
    check_node,
    check_value,
    keys_of,
    suggest,
    value_of,
)
from qtrain.config_schema.top import Top
from qtrain.errors import ConfigError

__all__ = ["SCHEMAS", "Top", "check", "check_argv", "exit_on_bad_argv", "keys_of"]

CONF = Path(__file__).resolve().parents[2] / "conf"


def check(cfg: DictConfig) -> None:
    """Check the composed config against the schemas; raises ConfigError."""
    from qtrain.config_schema.core import _hints

    for key, tp in _hints(Top).items():
        if key not in cfg:
            continue
        if tp is Node or tp == (Node | None):
            check_node(cfg[key], key)
        elif key == "extra_callbacks":
            extra = cfg[key]
            if isinstance(extra, DictConfig):
                for name in extra:
                    check_node(extra[name], f"extra_callbacks.{name}")
        else:
            v = value_of(cfg, key)
            if v is not SKIP:
                check_value(key, v, tp, "conf/train.yaml")


# ---- command line ------------------------------------------------------------------------

def _options(conf: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def _check_group(conf: Path, group: str, values: list) -> None:
    options = _options(conf, group)
    for v in values:
        if v is None or str(v) in options:
            continue
        raise ConfigError(f"{group}={v}: no such option in conf/{group}/"
                          f"{suggest(v, options)}; allowed: {', '.join(options)}")


def _walk(cfg, key: str, line: str) -> None:
    """Raise for the first component of the dotted ``key`` that is not in the config
    (``line``: the override as typed)."""
    node, done = cfg, []
    for part in key.split("."):
        if isinstance(node, ListConfig) and part.isdigit():
            node, done = (node[int(part)] if int(part) < len(node) else None), done + [part]
            continue
        if not isinstance(node, DictConfig):
            return  # a value, or null: Hydra says what is wrong
        if part not in node:
            parent = ".".join(done) or "the top level"
            keys = [str(k) for k in node if not str(k).startswith("_")]
            close = suggest(part, keys)
            if close and done:  # the full key: (did you mean 'quant.bits'?)
                close = close.replace(" '", " '" + ".".join(done) + ".", 1)
            raise ConfigError(
                f"{line}: no such key{close}; keys of {parent}: "
                f"{', '.join(keys)} (add a new key with +{key}=...)")
        try:
            node = node[part]
        except Exception:  # an interpolation that resolves only in the run
            return
        done.append(part)


def check_argv(argv: list[str], conf: Path = CONF) -> None:
    """Every group option and every key named by the command-line overrides exists; raises
    ConfigError with the closest names. Anything it cannot judge is left to Hydra."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (Exception, SystemExit):
        return  # Hydra reports its own usage and syntax errors
    if any(getattr(args, a, None) for a in ("help", "hydra_help", "info", "shell_completion",
                                            "config_path", "config_name", "config_dir",
                                            "experimental_rerun")):
        return
    keys, rest = [], []
    for o in overrides:
        name = o.key_or_group
        if name == "hydra" or name.startswith(("hydra.", "hydra/")) or o.package is not None \
                or o.is_delete() or o.is_add() or o.is_force_add():
            rest.append(o)
            continue
        if (conf / name).is_dir():
            try:
                values = (list(o.sweep_string_iterator()) if o.is_sweep_override()
                          else [o.value()])
            except Exception:  # glob(*) etc.: expanded by Hydra's sweeper, against conf/
                values = []
            _check_group(conf, name, values)
            rest.append(o)
        else:
            keys.append(o)
    if not keys:
        return
    compose_with = []
    for o in rest:
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # glob(*): which options it picks is the sweeper's business
                return
            compose_with.append(f"{o.get_key_element()}={first}")
        else:
            compose_with.append(o.input_line)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()  # whoever initialized Hydra in this process gets it back
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=compose_with)
    except Exception:
        return  # Hydra will report it with its own message
    finally:
        restore_gh_from_backup(backup)
    for o in keys:
        _walk(cfg, o.key_or_group, o.input_line)


def exit_on_bad_argv(argv: list[str], conf: Path = CONF) -> None:
    """:func:`check_argv` for ``train.py``: one line, exit status 2."""
    try:
        check_argv(argv, conf)
    except ConfigError as e:
        print(f"error: ConfigError: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
