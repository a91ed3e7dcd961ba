"""What a person reads in the terminal (issue 13, item 6): the end-of-run summary as a table,
the per-layer table of a small model, and a progress bar on CPU runs too.

Terminal or log file: the rich path is taken when rich's ``Console`` on stdout reports a
terminal -- stdout is a TTY, or the user forced it with ``FORCE_COLOR`` (non-empty) or
``TTY_COMPATIBLE=1`` (``TTY_COMPATIBLE=0`` forces plain). Otherwise (a log file, a pipe, CI,
pytest's capture) the summary is the plain ASCII table of :func:`qtrain.report.format_summary`
and the layer table plain text too: no ANSI escape codes and no box-drawing characters in a
log. Without rich installed (``pip install --no-deps``) the plain path is always taken.

* Summary: :func:`qtrain.report.summary_rows` (the same rows as the plain table: FP32 /
  quantized / float-master metrics, FP32 / quantized / packed / Huffman-coded sizes,
  compression, epochs and wall time, run dir), in sections.
* Per-layer table: the rows the layer report (:class:`qtrain.callbacks.layer_report.
  LayerReportCallback`) already computed at its last event (``end`` after fit), read from the
  callback -- nothing is recomputed; columns layer, method, bits (``K<k>/<block>`` for a
  codebook), bits per weight (storage bits / parameters), parameters, ||Q(W) - W|| / ||W||.
  Up to ``terminal.layer_table_max_rows`` layers one row each; beyond that one row per
  (method, bits) group (layers, parameters, storage bits per weight over the group, mean and
  max error) and the CSV's path. ``0`` prints no per-layer table. Without the layer report
  (``callbacks.layer_report.enabled=false``, ``callbacks=none``) there is none.
* Progress bar: ``trainer.enable_progress_bar`` -- ``null`` (the default of conf/trainer/*):
  Lightning's ``RichProgressBar`` when stdout is an interactive terminal (a TTY, rich's
  ``is_interactive``: not ``TERM=dumb``, not ``TTY_INTERACTIVE=0``; ``TTY_INTERACTIVE=1``
  forces it), none otherwise, so log files and CI logs stay free of bar redraws;
  ``true`` / ``false``: always / never (Lightning's meaning). ``terminal.progress_refresh_rate``:
  redraws per second (Lightning's default, 100, wakes its refresh thread 100 times a second;
  a few are enough to read); ``terminal.progress_leave``: keep each epoch's finished bar.
  Without rich, ``true`` / a terminal gets Lightning's ``TQDMProgressBar``. A progress-bar
  callback the config already adds (``extra_callbacks``) is kept instead.
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

from qtrain.errors import ConfigError
from qtrain.report import format_summary, summary_rows

LAYER_COLUMNS = ("layer", "method", "bits", "bits/weight", "params", "rel. error")
GROUP_COLUMNS = ("method", "bits", "layers", "params", "bits/weight", "rel. error mean / max")


class Terminal:
    """The ``terminal`` config node (conf/train.yaml).

    Args:
        layer_table_max_rows: print the per-layer table row by row for at most this many
            quantized layers, grouped by (method, bits) beyond; 0: no per-layer table.
        progress_refresh_rate: redraws per second of the Rich progress bar (>= 1).
        progress_leave: keep each epoch's finished bar on screen (Lightning's ``leave``).
    """

    def __init__(self, layer_table_max_rows: int = 25, progress_refresh_rate: int = 4,
                 progress_leave: bool = False) -> None:
        for key, v, lo in (("layer_table_max_rows", layer_table_max_rows, 0),
                           ("progress_refresh_rate", progress_refresh_rate, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"terminal.{key}={v!r}; allowed: an int >= {lo}")
        self.layer_table_max_rows = layer_table_max_rows
        self.progress_refresh_rate = progress_refresh_rate
        self.progress_leave = bool(progress_leave)


def settings(cfg) -> Terminal:
    """The run's :class:`Terminal` (defaults when the config has no ``terminal`` node)."""
    node = cfg.get("terminal") if cfg is not None else None
    if not node:
        return Terminal()
    return Terminal(**{k: v for k, v in node.items() if k != "_target_"})


# ---------------------------------------------------------------------------------------
# terminal or log file
# ---------------------------------------------------------------------------------------

def _console(file=None):
    """A rich Console on ``file`` (stdout), or None without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=file if file is not None else sys.stdout)


def is_terminal(file=None) -> bool:
    """True when ``file`` (stdout) takes the rich path (module docstring)."""
    c = _console(file)
    return bool(c is not None and c.is_terminal)


def is_interactive(file=None) -> bool:
    """True when a live progress bar belongs on ``file`` (stdout): a TTY that rich deems
    interactive, or ``TTY_INTERACTIVE=1``."""
    f = file if file is not None else sys.stdout
    forced = os.environ.get("TTY_INTERACTIVE")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        tty = bool(f.isatty())
    except (AttributeError, ValueError):
        return False
    c = _console(f)
    return tty and (c.is_interactive if c is not None else os.environ.get("TERM") != "dumb")


# ---------------------------------------------------------------------------------------
# progress bar
# ---------------------------------------------------------------------------------------

def add_progress_bar(cfg, callbacks: list) -> bool:
    """Append the progress-bar callback the run gets (module docstring) to ``callbacks``;
    returns the Trainer's ``enable_progress_bar``."""
    from pytorch_lightning.callbacks import ProgressBar

    flag = cfg.trainer.get("enable_progress_bar") if cfg.get("trainer") else None
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"trainer.enable_progress_bar={flag!r}; allowed: null (a bar on an "
                          "interactive terminal only), true, false")
    show = is_interactive() if flag is None else flag
    if not show:
        return False
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return True  # the config brought its own
    try:
        import rich  # noqa: F401
    except ImportError:
        return True  # Lightning's TQDMProgressBar
    from pytorch_lightning.callbacks import RichProgressBar

    t = settings(cfg)
    callbacks.append(RichProgressBar(refresh_rate=t.progress_refresh_rate,
                                     leave=t.progress_leave))
    return True


# ---------------------------------------------------------------------------------------
# per-layer table
# ---------------------------------------------------------------------------------------

def layer_rows(trainer) -> tuple[str | None, list[dict], str | None]:
    """(event, rows, CSV path) of the layer report's last event (``end`` when there is one),
    taken from the trainer's LayerReportCallback; (None, [], None) without one."""
    for cb in getattr(trainer, "callbacks", None) or []:
        reports = getattr(cb, "reports", None)
        if type(cb).__name__ == "LayerReportCallback" and reports:
            event = "end" if "end" in reports else list(reports)[-1]
            files = (getattr(cb, "files", None) or {}).get(event) or [None]
            return event, list(reports[event]), files[0]
    return None, [], None


def _num(v) -> float | None:
    """A float from a row value (a CSV string included); None for empty / None."""
    if v is None or v == "":
        return None
    return float(v)


def _bits_label(r: dict) -> str:
    if _num(r.get("bits")) is not None:
        return str(int(_num(r["bits"])))
    k, bs = _num(r.get("n_centroids")), _num(r.get("block_size"))
    if k is not None:
        return f"K{int(k)}" + (f"/{int(bs)}" if bs is not None else "")
    return "-"


def _f(v, fmt: str) -> str:
    v = _num(v)
    return "-" if v is None else ("n/a" if math.isnan(v) else format(v, fmt))


def layer_cells(rows: list[dict]) -> list[tuple[str, ...]]:
    """One tuple of :data:`LAYER_COLUMNS` strings per layer."""
    return [(str(r["layer"]), str(r["method"]), _bits_label(r), _f(r.get("bits_per_weight"), ".3f"),
             str(int(_num(r["params"]))), _f(r.get("rel_error"), ".4f")) for r in rows]


def group_cells(rows: list[dict]) -> list[tuple[str, ...]]:
    """One tuple of :data:`GROUP_COLUMNS` strings per (method, bits) group, in first-seen
    order; bits/weight = the group's storage bits / its parameters."""
    groups: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault((str(r["method"]), _bits_label(r)), []).append(r)
    out = []
    for (method, bits), rs in groups.items():
        params = sum(int(_num(r["params"])) for r in rs)
        sb = [_num(r.get("storage_bits")) for r in rs]
        bpw = f"{sum(sb) / params:.3f}" if params and None not in sb else "-"
        errs = [e for e in (_num(r.get("rel_error")) for r in rs) if e is not None
                and not math.isnan(e)]
        err = f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}" if errs else "n/a"
        out.append((method, bits, str(len(rs)), str(params), bpw, err))
    return out


def _plain_table(title: str, header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = "+" + "+".join("-" * (n + 2) for n in w) + "+"

    def row(c):
        return "| " + " | ".join(s.ljust(n) for s, n in zip(c, w)) + " |"

    return "\n".join([title, line, row(header), line, *map(row, cells), line])


def layer_table_text(rows: list[dict], max_rows: int, event: str | None = None,
                     csv_path: str | None = None) -> str:
    """The per-layer table (or its grouped summary) as plain text; "" for no rows / 0."""
    if not rows or max_rows <= 0:
        return ""
    title, header, cells = _layer_title(rows, max_rows, event)
    text = _plain_table(title, header, cells)
    if len(rows) > max_rows and csv_path:
        text += f"\nevery layer: {csv_path}"
    return text


def _layer_title(rows, max_rows, event):
    at = f" ({event})" if event else ""
    if len(rows) <= max_rows:
        return f"per-layer quantization{at}", LAYER_COLUMNS, layer_cells(rows)
    return (f"per-layer quantization{at}: {len(rows)} layers > terminal.layer_table_max_rows="
            f"{max_rows}, grouped by method and bits", GROUP_COLUMNS, group_cells(rows))


# ---------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------

def _rich_summary(summary: dict):
    from rich.table import Table

    t = Table(title="qtrain run summary", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("", overflow="fold")
    last = None
    for group, key, value in summary_rows(summary):
        if last is not None and group != last:
            t.add_section()
        last = group
        style = "bold green" if key.startswith("quantized") and "(test)" in key else (
            "dim" if value == "-" else None)
        t.add_row(key, value, style=style)
    return t


def _rich_layers(rows, max_rows, event):
    from rich.table import Table

    title, header, cells = _layer_title(rows, max_rows, event)
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
    for c in cells:
        t.add_row(*c)
    return t


def print_summary(summary: dict, rows: list[dict] | None = None, max_rows: int = 25,
                  event: str | None = None, csv_path: str | None = None, file=None) -> None:
    """Print the per-layer table (``rows`` of the layer report's ``event``, written to
    ``csv_path``) and the run summary to ``file`` (stdout): rich tables on a terminal, plain
    text otherwise (module docstring)."""
    f = file if file is not None else sys.stdout
    rows = rows or []
    console = _console(f)
    if console is None or not console.is_terminal:
        text = layer_table_text(rows, max_rows, event, csv_path)
        print((text + "\n" if text else "") + format_summary(summary), file=f, flush=True)
        return
    if rows and max_rows > 0:
        console.print(_rich_layers(rows, max_rows, event))
        if len(rows) > max_rows and csv_path:
            console.print(f"every layer: {csv_path}", highlight=False, soft_wrap=True)
    console.print(_rich_summary(summary))
    f.flush()


def print_run_end(summary: dict, trainer, cfg) -> None:
    """:func:`print_summary` of a finished run (qtrain.run.train): the layer report's rows
    from ``trainer``'s callback, the row limit from ``cfg.terminal``."""
    event, rows, csv_path = layer_rows(trainer)
    print_summary(summary, rows, settings(cfg).layer_table_max_rows, event, csv_path)
