"""Build the reports folder: what ``run_all.sh`` runs (``bloodcell build``).

Executes 01-03 of every experiment (``experiments/*.yaml``) and 04 once with papermill and the
``bloodcell`` kernel into a staging folder beside reports/, converts each to HTML (code
hidden), writes metrics.json (with the build's wall-clock ``build_seconds``) and index.html,
then swaps the staging folder in with one atomic rename. A lock (``reports/.lock``) keeps two
builds apart. A failing notebook is reported by experiment, notebook and error, and the last
good reports stay. A notebook whose inputs are unchanged since the live reports were built is
copied from them instead of run (``reuse``; ``--rebuild`` forces), and metrics.json's ``build``
says what ran, why, and in how many seconds. What the reports say is ``bloodcell_lib.reporting``
(records, targets, ablation, index).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import errno
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bloodcell_lib.build import reuse
from bloodcell_lib.build.progress import Planned, Progress
from bloodcell_lib.core.fileio import atomic_write_json, atomic_write_text
from bloodcell_lib.core.paths import EXPERIMENTS_DIR, NOTEBOOKS_DIR, PROJECT_ROOT, runs_dir
from bloodcell_lib.reporting.document import metrics_document
from bloodcell_lib.reporting.index import write_index
from bloodcell_lib.reporting.records import (EXPERIMENT_NOTEBOOKS, FIGURES_DIR, INDEX_FILE, METRICS_FILE, RECORD_FILE,
                                             REPORT_NOTEBOOK, load_records, reports_dir)

KERNEL_NAME = "bloodcell"
COUNT_NOTEBOOK = "05_count"
LOCK_FILE = ".lock"
# run_all.sh --profile: the TrainConfig profile its notebooks run under, and whether it runs the
# experiments marked `build: ablation` (full leaves them out to stay within the 60-minute target).
PROFILES = {"full": ("full", False), "complete": ("full", True), "smoke": ("smoke", True)}
ABLATION_LEFT_OUT = ("ablation, left out of the default full build to keep it under 60 minutes; "
                     "run ./run_all.sh --profile complete")


class RunAllError(RuntimeError):
    """A build problem found before or between notebooks (bad experiment file, lock held)."""


class LockBusy(RunAllError):
    pass


def _log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[run_all {stamp}] {message}", flush=True)


# --------------------------------------------------------------------------- experiments

def experiment_dirs() -> list[Path]:
    """Folders holding experiment YAML files: $BLOODCELL_EXPERIMENTS (os.pathsep-separated)
    or experiments/."""
    env = os.environ.get("BLOODCELL_EXPERIMENTS")
    if env:
        return [Path(p).expanduser().absolute() for p in env.split(os.pathsep) if p]
    return [EXPERIMENTS_DIR]


def discover_experiments(dirs: Sequence[Path] | None = None) -> dict[str, dict[str, Any]]:
    """name -> {"path", "params"} for every ``*.yaml``/``*.yml``; the name is the file stem.

    Keys must be TrainConfig fields (checked here, before any notebook runs); values are
    checked by the notebooks' first cells (config.make_config). Every field is passed, the
    ones a file leaves out at TrainConfig's defaults, so the notebooks' own parameter
    defaults (an example experiment for JupyterLab users) never leak into an experiment."""
    from bloodcell_lib.training.config import FIELD_NAMES, PLAIN_NAME, ConfigError, TrainConfig, read_params

    found: dict[str, dict[str, Any]] = {}
    for folder in dirs if dirs is not None else experiment_dirs():
        if not folder.is_dir():
            raise RunAllError(f"experiments folder {folder} does not exist")
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            name = path.stem
            if not re.fullmatch(PLAIN_NAME, name):
                raise RunAllError(f"{path}: experiment file names may hold letters, digits, '-', '_' and '.' only")
            if name in found:
                raise RunAllError(f"experiment '{name}' is defined twice: {found[name]['path']} and {path}")
            try:
                params = read_params(path)
            except ConfigError as err:
                raise RunAllError(str(err)) from err
            unknown = sorted(set(params) - set(FIELD_NAMES))
            if unknown:
                raise RunAllError(f"{path}: unknown parameter(s) {', '.join(unknown)}; "
                                  f"accepted: {', '.join(FIELD_NAMES)}")
            if params.get("name", name) != name:
                raise RunAllError(f"{path}: 'name' = {params['name']!r} must equal the file name '{name}' (or be left out)")
            if "profile" in params:
                raise RunAllError(f"{path}: 'profile' is chosen by run_all.sh --profile, not by the experiment file")
            found[name] = {"path": path, "params": {**TrainConfig().to_dict(), **params, "name": name}}
    if not found:
        raise RunAllError("no experiment files (*.yaml) in " + ", ".join(str(d) for d in (dirs or experiment_dirs())))
    return {name: found[name] for name in dependency_order(found)}


def dependency_order(experiments: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Experiment names in file order, except that one whose ``init_from`` names another
    experiment comes after it (it starts from that experiment's checkpoint)."""
    ordered: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in chain:
            raise RunAllError("experiments start from each other in a circle (init_from): "
                              + " -> ".join([*chain[chain.index(name):], name]))
        source = experiments[name]["params"].get("init_from")
        if source in experiments:
            visit(source, (*chain, name))
        ordered.append(name)

    for name in experiments:
        visit(name, ())
    return ordered


def select_experiments(experiments: Mapping[str, Mapping[str, Any]], profile: str,
                       only: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """(the experiments this build runs, in order; name -> why each other one the profile leaves
    out is left out). ``--only`` names run whatever their ``build``; otherwise ``full`` runs the
    main experiments and ``complete`` and ``smoke`` every one. A main experiment that starts from
    an ablation (init_from) is refused: the full build would lack its checkpoint."""
    with_ablations = PROFILES[profile][1]
    ablations = {n for n, e in experiments.items() if e["params"].get("build") == "ablation"}
    for name, experiment in experiments.items():
        source = experiment["params"].get("init_from")
        if name not in ablations and source in ablations:
            raise RunAllError(f"{experiment['path']}: a main experiment cannot start from the ablation "
                              f"'{source}' (init_from): the default full build does not run it")
    if only:
        selected = [n for n in experiments if n in only]
    else:
        selected = [n for n in experiments if with_ablations or n not in ablations]
    left_out = {n: ABLATION_LEFT_OUT for n in experiments if n in ablations and n not in selected and not with_ablations}
    return selected, left_out


# --------------------------------------------------------------------------- lock

class BuildLock:
    """An exclusive flock on ``<reports>/.lock``. The lock file is hard-linked into every new
    reports folder before the swap, so the path keeps naming the same locked inode."""

    def __init__(self, live: Path):
        self.live = live
        self.path = live / LOCK_FILE
        self.fd: int | None = None

    def holder(self, patience_s: float = 2.0) -> str:
        # The holder writes its details just after taking the lock, so a reader that lost the
        # race by microseconds sees an empty file: look again for a moment before giving up.
        deadline = time.monotonic() + patience_s
        while True:
            try:
                info = json.loads(self.path.read_text())
                return (f"run_all.sh with PID {info['pid']} (started {info.get('started')}, "
                        f"command: {info.get('command')})")
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() >= deadline:
                    return "another run_all.sh (holder unknown)"
                time.sleep(0.05)

    def acquire(self, wait: bool, command: str = "run_all.sh") -> None:
        import fcntl

        self.live.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            if not wait:
                os.close(self.fd)
                self.fd = None
                raise LockBusy(f"another build of {self.live} is running: {holder}. Not starting a second one "
                               f"(lock {self.path}). Wait for it to finish, or pass --wait to queue behind it.")
            _log(f"waiting: {holder} holds {self.path}")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            _log("lock acquired")
        info = {"pid": os.getpid(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
                "command": command}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        import fcntl

        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- atomic swap

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False when
    the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def swap_in(staging: Path, live: Path) -> None:
    """Make ``staging`` the new ``live`` folder: one atomic exchange where supported (readers
    see the old tree or the new one, never a mix), else two renames; the old tree is deleted."""
    if not live.exists():
        os.rename(staging, live)
        return
    if _exchange(staging, live):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous reports
        return
    old = live.parent / f".{live.name}.old-{os.getpid()}"
    os.rename(live, old)
    os.rename(staging, live)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- kernels

class Kernels:
    """The ``bloodcell`` kernels that execute the notebooks.

    ``fresh``: a new kernel per notebook (each notebook starts from nothing, as in JupyterLab).
    ``shared``: one kernel for the whole build, its namespace reset (``%reset -f``, figures
    closed) between notebooks -- saves the 5-8 s of interpreter start and torch import per
    notebook that dominate a smoke build. Kernel stderr goes to ``log_path``; ``reports``: the
    folder the kernels write their reports to (their $BLOODCELL_REPORTS).
    """

    def __init__(self, mode: str, log_path: Path, reports: Path):
        self.mode = mode
        self.log_path = log_path
        # Given to each kernel rather than set in os.environ, so the build process itself
        # still sees the live reports folder (and its caller's environment is left alone).
        self.env = {**os.environ, "BLOODCELL_REPORTS": str(reports)}
        self.shared = None
        self.alive: list = []  # started and not yet shut down

    def _start(self, cwd: Path):
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name=KERNEL_NAME)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            km.start_kernel(cwd=str(cwd), stdout=log, stderr=log, env=self.env)
        finally:
            log.close()
        self.alive.append(km)
        return km

    def get(self, cwd: Path):
        if self.mode == "fresh":
            return self._start(cwd)
        if self.shared is None or not self.shared.is_alive():
            self.shared = self._start(cwd)
        self._reset(self.shared, cwd)
        return self.shared

    def _reset(self, km, cwd: Path) -> None:
        code = ("get_ipython().run_line_magic('reset', '-f')\n"
                "import os as _os, matplotlib.pyplot as _plt\n"
                "_plt.close('all')\n"
                f"_os.chdir({str(cwd)!r})\n"
                "del _os, _plt\n")
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)
            reply = kc.execute_interactive(code, timeout=120, store_history=False, output_hook=lambda msg: None)
            if reply["content"].get("status") != "ok":
                raise RunAllError(f"could not reset the shared kernel: {reply['content'].get('evalue')}")
        finally:
            kc.stop_channels()

    def done(self, km) -> None:
        if self.mode == "fresh":
            self._shutdown(km)

    def close(self) -> None:
        if self.shared is not None:
            self._shutdown(self.shared)
            self.shared = None

    def _shutdown(self, km) -> None:
        if _STOP["signal"] is not None:
            # Stopping: no graceful shutdown. It would run the notebook client's event loop
            # again, whose interrupted tasks then wait forever for the killed kernel's reply.
            self.kill_all()
        else:
            _shutdown(km)
        if km in self.alive:
            self.alive.remove(km)

    def kill_all(self) -> None:
        """SIGKILL every kernel still running. Kernels run in their own session, so a signal
        to run_all.sh never reaches them; safe inside a signal handler (only system calls)."""
        for km in list(self.alive):
            provisioner = getattr(km, "provisioner", None)
            group = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)
            if group:
                try:
                    os.killpg(group, signal.SIGKILL)
                except OSError:
                    pass


def _shutdown(km) -> None:
    try:
        if km.is_alive():
            km.shutdown_kernel(now=False)
    except Exception:  # noqa: BLE001 - a kernel that is already gone is fine
        try:
            km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- notebooks -> HTML

_HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{#- Reports must open offline: no require.js, MathJax or mermaid from a CDN (the notebooks
    use none of them), which also keeps the browser console free of load errors. -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
{{ super() }}
<style>
figure.bloodcell-figure figcaption{font-size:.9em;color:#57606a;margin-top:.2em}
table.bloodcell-table{border-collapse:collapse} table.bloodcell-table th,table.bloodcell-table td{padding:2px 8px}
</style>
{%- endblock extra_css -%}
"""

_EXPORTER = None


def html_exporter():
    """nbconvert's lab HTML exporter, code cells hidden (``--no-input``), offline template."""
    global _EXPORTER
    if _EXPORTER is None:
        from jinja2 import DictLoader
        from nbconvert import HTMLExporter
        from traitlets.config import Config

        # Coalescing streams applies carriage returns as a terminal would, so a tqdm bar
        # reads as its last state instead of one line per update.
        config = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
        _EXPORTER = HTMLExporter(config=config, template_name="lab",
                                 extra_loaders=[DictLoader({"bloodcell.html.j2": _HTML_TEMPLATE})],
                                 template_file="bloodcell.html.j2")
        _EXPORTER.exclude_input = True
        _EXPORTER.exclude_input_prompt = True
        _EXPORTER.exclude_output_prompt = True
    return _EXPORTER


def notebook_to_html(ipynb: Path, html_path: Path | None = None, title: str | None = None) -> Path:
    import nbformat

    html_path = html_path or ipynb.with_suffix(".html")
    nb = nbformat.read(ipynb, as_version=4)
    body, _ = html_exporter().from_notebook_node(nb, resources={"metadata": {"name": title or ipynb.stem}})
    atomic_write_text(html_path, body)
    return html_path


def _renumber(ipynb: Path) -> None:
    """Execution counts 1..n (a shared kernel keeps counting across notebooks)."""
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.get("execution_count") is None:
            continue
        count += 1
        cell.execution_count = count
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
    nbformat.write(nb, str(ipynb))


class NotebookFailed(RunAllError):
    def __init__(self, experiment: str, notebook: str, error: str, executed: Path):
        self.experiment, self.notebook, self.error, self.executed = experiment, notebook, error, executed
        super().__init__(f"experiment '{experiment}', notebook {notebook}: {error}")


def _short_error(err: BaseException, executed: Path | None = None) -> str:
    ename = getattr(err, "ename", None)
    if ename:
        evalue = str(getattr(err, "evalue", "")).strip()
        where = ""
        cell = _error_cell(executed) if executed is not None else None
        if cell is not None:
            where = f" (cell In [{cell}])"
        return f"{ename}: {evalue}{where}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _error_cell(executed: Path) -> int | None:
    """Execution count (as renumbered in the executed notebook) of the cell that raised."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001
        return None
    for cell in nb.cells:
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return cell.get("execution_count")
    return None


def execute_notebook(kernels: Kernels, source: Path, output: Path, params: Mapping[str, Any], *,
                     experiment: str, cwd: Path, verbose: bool = False, cell_timeout: int | None = None) -> float:
    """Run one notebook with papermill into ``output`` (then HTML beside it); returns seconds.
    Raises NotebookFailed (the executed notebook, error cell included, is still written)."""
    import papermill as pm

    started = time.time()
    output.parent.mkdir(parents=True, exist_ok=True)
    km = None
    error: BaseException | None = None
    try:
        km = kernels.get(cwd)
        pm.execute_notebook(str(source), str(output), parameters=dict(params), kernel_name=KERNEL_NAME, km=km,
                            progress_bar=False, log_output=verbose, cwd=None,
                            execution_timeout=cell_timeout, start_timeout=120)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - reported with experiment and notebook below
        error = err
    finally:
        if km is not None:
            kernels.done(km)
    if _STOP["signal"] is not None:  # the stop landed where the notebook client swallowed it
        raise KeyboardInterrupt
    if output.is_file():
        try:
            _renumber(output)
            notebook_to_html(output, title=f"{experiment} \u00b7 {source.stem}")
        except Exception as err:  # noqa: BLE001
            if error is None:
                error = err
    elif error is None:
        error = RunAllError(f"papermill wrote no output notebook {output}")
    if error is not None:
        raise NotebookFailed(experiment, source.name, _short_error(error, output), output) from error
    return time.time() - started


# --------------------------------------------------------------------------- the build

def _parse_run_all(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_all.sh",
        description="Execute every experiment's notebooks (01_explore, 02_train, 03_evaluate) with papermill and "
                    "the 'bloodcell' kernel, then 04_report once; write executed notebooks, HTML (code hidden), "
                    "metrics.json and index.html into the reports folder, replacing it atomically.",
        epilog="Environment: BLOODCELL_REPORTS (reports folder, default reports/), BLOODCELL_RUNS (run folders, "
               "default runs/), BLOODCELL_CACHE (image cache), BLOODCELL_DATA (data root), BLOODCELL_EXPERIMENTS "
               "(experiment folders separated by ':', default experiments/).")
    parser.add_argument("--profile", choices=tuple(PROFILES), default="full",
                        help="full (default): the main experiments at full scale, the experiments marked "
                             "'build: ablation' left out so the build stays within 60 minutes (the report says "
                             "which, and labels any earlier record of them with its commit); complete: every "
                             "experiment at full scale, ablations included; smoke: every experiment on tiny "
                             "subsets, 1 epoch, low resolution. --only runs the experiments it names whatever "
                             "their 'build'")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this experiment (repeatable or comma-separated); other experiments' reports "
                             "and records are kept")
    parser.add_argument("--rebuild", action="append", default=[], metavar="NAME",
                        help="run this experiment's notebooks even where their inputs are unchanged (repeatable or "
                             "comma-separated; 'all': every notebook, 04_report included). Otherwise a notebook whose "
                             "key (parameters, library source, requirements.lock, notebook, data, parents, profile) "
                             "matches the last build's is copied from the live reports instead of run")
    parser.add_argument("--wait", action="store_true", help="wait for a running build instead of refusing")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failing notebook, still run the other experiments (the build still fails)")
    parser.add_argument("--kernel", choices=("auto", "fresh", "shared"), default="auto",
                        help="fresh: a new kernel per notebook; shared: one kernel, namespace reset between "
                             "notebooks; auto (default): shared for smoke, fresh for full")
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="S", help="fail a cell running longer")
    parser.add_argument("--verbose", action="store_true", help="also print every cell's output")
    parser.add_argument("--list", action="store_true", help="print the experiments and notebooks, run nothing")
    args = parser.parse_args(list(argv))
    args.command = " ".join(["run_all.sh", *argv])  # recorded in the lock file and the records
    args.only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    args.rebuild = [n.strip() for item in args.rebuild for n in item.split(",") if n.strip()]
    if args.kernel == "auto":
        args.kernel = "shared" if args.profile == "smoke" else "fresh"
    return args


def _output_base(output_dir: str | None) -> Path:
    """An experiment's ``output_dir`` (relative to the project), or the runs folder."""
    if output_dir:
        base = Path(output_dir).expanduser()
        return base if base.is_absolute() else PROJECT_ROOT / base
    return runs_dir()


def smoke_output_dir(output_dir: str | None) -> Path:
    """Where smoke runs go: ``<runs>/smoke`` (``<output_dir>/smoke`` when the experiment sets one)."""
    return _output_base(output_dir) / "smoke"


def resolved_params(experiment: Mapping[str, Any], profile: str) -> dict[str, Any]:
    """What papermill is given for one experiment: its parameters, the notebooks' profile (full for
    ``complete``) and (smoke) the smoke runs folder."""
    profile = PROFILES[profile][0]
    params = {**experiment["params"], "profile": profile}
    if profile == "smoke":
        # Smoke runs must never overwrite the full study's checkpoints.
        params["output_dir"] = str(smoke_output_dir(params.get("output_dir")))
    return params


def run_dir_of(params: Mapping[str, Any]) -> Path:
    """The run folder 02_train writes (TrainConfig.run_dir of these parameters)."""
    return _output_base(params.get("output_dir")) / params["name"]


# The build's kernels and the stop signal received, for the signal handler.
_STOP: dict[str, Any] = {"kernels": None, "signal": None}


def _on_stop_signal(signum, frame):  # noqa: ARG001
    """SIGTERM / SIGINT: stop the build, killing the running kernel (the training cell would
    otherwise run on). KeyboardInterrupt, not another exception: raised inside the notebook
    client's event loop, only KeyboardInterrupt and SystemExit get out of its tasks; anything
    else is stored in the task and the client waits on for the dead kernel's reply."""
    _STOP["signal"] = signum
    if _STOP["kernels"] is not None:
        _STOP["kernels"].kill_all()
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    """``bloodcell build`` (run_all.sh): argv are run_all.sh's options."""
    args = _parse_run_all(argv)
    live = reports_dir()
    try:
        experiments = discover_experiments()
    except RunAllError as err:
        print(f"run_all.sh: {err}", file=sys.stderr)
        return 2
    for option, names, also in (("--only", args.only, ()), ("--rebuild", args.rebuild, ("all", REPORT_NOTEBOOK))):
        unknown = [n for n in names if n not in experiments and n not in also]
        if unknown:
            print(f"run_all.sh: {option} {', '.join(unknown)}: no such experiment; known: "
                  f"{', '.join([*experiments, *also])}", file=sys.stderr)
            return 2
    try:
        selected, left_out = select_experiments(experiments, args.profile, args.only)
    except RunAllError as err:
        print(f"run_all.sh: {err}", file=sys.stderr)
        return 2
    if args.verbose:  # papermill logs each cell's output through logging
        import logging

        logging.basicConfig(level=logging.INFO, format="    %(message)s")
    if args.list:
        for name in selected:
            print(f"{name}: {experiments[name]['path']} -> {live / name}/"
                  f"{{{','.join(EXPERIMENT_NOTEBOOKS)}}}.{{ipynb,html}}")
        for name, why in left_out.items():
            print(f"{name}: not in this build ({why})")
        print(f"{REPORT_NOTEBOOK}: -> {live / (REPORT_NOTEBOOK + '.html')}; index: {live / INDEX_FILE}")
        return 0

    lock = BuildLock(live)
    try:
        lock.acquire(wait=args.wait, command=args.command)
    except LockBusy as err:
        print(f"run_all.sh: {err}", file=sys.stderr)
        return 75  # EX_TEMPFAIL
    _STOP["signal"] = None
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _build(args, live, lock, experiments, selected, left_out)
    except KeyboardInterrupt:
        _log(f"interrupted; {live} left as it was")
        return 130
    except Exception as err:  # noqa: BLE001 - a build error outside any notebook
        print(f"run_all.sh: build failed: {type(err).__name__}: {err}; {live} left as it was", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(_staging_path(live), ignore_errors=True)  # gone already unless the build broke off
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.release()


def _staging_path(live: Path) -> Path:
    return live.parent / f".{live.name}.staging-{os.getpid()}"


class _Step:
    """Runs or reuses the build's notebooks one at a time, keeping what reran and why."""

    def __init__(self, args, live: Path, kernels: Kernels, params_of: Mapping[str, Mapping[str, Any]]):
        self.args, self.live, self.kernels, self.params_of = args, live, kernels, params_of
        self.fp = reuse.Fingerprints()
        self.forced_all = "all" in args.rebuild
        self.keys: dict[tuple[str, str], str] = {}
        self.ran: set[tuple[str, str]] = set()
        self.done: list[reuse.Work] = []
        self.progress = Progress([])  # the build sets the plan (plan())

    def plan(self, names: Sequence[str]) -> list[Planned]:
        """Every notebook of this build in order, whether it is expected to run (the same decision
        as ``step``, the not yet known runs of its parents guessed from this plan) and its seconds
        when it last ran under this profile (for the progress lines' estimate)."""
        profile = PROFILES.get(self.args.profile, (self.args.profile,))[0]

        def last(entry: Mapping[str, Any] | None) -> float | None:
            entry = entry or {}
            return entry.get("seconds") if (entry.get("inputs") or {}).get("profile") == profile else None

        keys: dict[tuple[str, str], str] = {}
        ran: set[tuple[str, str]] = set()
        planned: list[Planned] = []
        for name in names:
            params = self.params_of[name]
            previous = reuse.read_keys(self.live / name)
            for work in reuse.experiment_work(self.fp, name, params, experiment_notebooks(params), keys, self.recorded):
                keys[(name, work.notebook)] = work.key
                work.forced = self.forced_all or name in self.args.rebuild
                entry = previous.get(work.notebook)
                runs = self._decide(work, entry, self.live / name, ran)[0] == reuse.RAN
                if runs:
                    ran.add((name, work.notebook))
                planned.append(Planned(name, work.notebook, runs, last(entry)))
        entry = reuse.read_keys(self.live).get(REPORT_NOTEBOOK)
        report_runs = bool(ran) or entry is None or self.forced_all or REPORT_NOTEBOOK in self.args.rebuild
        planned.append(Planned(reuse.REPORT_EXPERIMENT, REPORT_NOTEBOOK, report_runs, last(entry)))
        return planned

    def _decide(self, work: reuse.Work, previous: Mapping[str, Any] | None, live_dir: Path,
                ran: set[tuple[str, str]]) -> tuple[str, str]:
        """reuse.decide, the outputs looked for in the live reports (02_train: and its checkpoint,
        with the same key, in the run folder)."""
        present = reuse.outputs_present(live_dir, previous, work.notebook)
        if present and work.notebook == reuse.TRAIN:
            run_dir = run_dir_of(self.params_of[work.experiment])
            present = (reuse.checkpoint_present(run_dir)
                       and reuse.read_keys(run_dir).get(work.notebook, {}).get("key") == previous.get("key"))
        return reuse.decide(work, previous, outputs_present=present, ran=ran)

    def recorded(self, experiment: str, notebook: str) -> str | None:
        """The key an earlier build kept for work this build does not run (a parent left out by --only)."""
        folder = run_dir_of(self.params_of[experiment]) if notebook == reuse.TRAIN else self.live / experiment
        return reuse.read_keys(folder).get(notebook, {}).get("key")

    def experiment(self, name: str, out: Path, tag: str) -> list[reuse.Work]:
        params = self.params_of[name]
        previous = reuse.read_keys(self.live / name)
        works = reuse.experiment_work(self.fp, name, params, experiment_notebooks(params), self.keys, self.recorded)
        for work in works:
            work.forced = self.forced_all or name in self.args.rebuild
            self.keys[(name, work.notebook)] = work.key
            run_dir = run_dir_of(params) if work.notebook == reuse.TRAIN else None
            self.step(work, previous.get(work.notebook), self.live / name, out, params, tag=f"{tag} {name}: ",
                      run_dir=run_dir)
        atomic_write_json(out / reuse.KEY_FILE, reuse.key_document(name, {w.notebook: w.entry for w in works}))
        return works

    def report(self, staging: Path, names: Sequence[str]) -> reuse.Work:
        keys = {(n, nb): e.get("key") for n in names for nb, e in reuse.read_keys(staging / n).items()}
        params = {"profile": PROFILES.get(self.args.profile, (self.args.profile,))[0], "experiments": list(names)}
        work = reuse.report_work(self.fp, REPORT_NOTEBOOK, params, keys)
        work.forced = self.forced_all or REPORT_NOTEBOOK in self.args.rebuild
        self.step(work, reuse.read_keys(self.live).get(REPORT_NOTEBOOK), self.live, staging, params, tag="",
                  skip=(*names, "_logs", LOCK_FILE, METRICS_FILE))
        atomic_write_json(staging / reuse.KEY_FILE, reuse.key_document(reuse.REPORT_EXPERIMENT,
                                                                      {REPORT_NOTEBOOK: work.entry}))
        return work

    def step(self, work: reuse.Work, previous: Mapping[str, Any] | None, live_dir: Path, out: Path,
             params: Mapping[str, Any], *, tag: str, run_dir: Path | None = None, skip: Sequence[str] = ()) -> None:
        """Copy the notebook's outputs from the live reports when its key matched and they are
        all there (02_train: and its checkpoint, with the same key in the run folder), else run it."""
        nb = work.notebook
        work.status, work.reason = self._decide(work, previous, live_dir, self.ran)
        started = time.time()
        if work.status == reuse.REUSED:
            reuse.copy_outputs(live_dir, out, previous["outputs"])
            work.entry = dict(previous)
            work.seconds = round(time.time() - started, 2)
            _log(self.progress.line(work.experiment, nb, f"reused ({work.reason}; ran in "
                                    f"{previous.get('seconds', 0):.1f} s then)", runs=False))
            return
        _log(self.progress.line(work.experiment, nb, f"started (runs: {work.reason})", runs=True))
        if run_dir is not None:  # the checkpoint is about to change: its old key no longer holds
            (run_dir / reuse.KEY_FILE).unlink(missing_ok=True)
        before = reuse.file_states(out, skip)
        seconds = execute_notebook(self.kernels, NOTEBOOKS_DIR / f"{nb}.ipynb", out / f"{nb}.ipynb", params,
                                   experiment=work.experiment, cwd=out, verbose=self.args.verbose,
                                   cell_timeout=self.args.cell_timeout)
        work.entry = reuse.entry(work, reuse.written(before, reuse.file_states(out, skip)), seconds)
        work.seconds = round(seconds, 2)
        self.ran.add((work.experiment, nb))
        if run_dir is not None:
            atomic_write_json(run_dir / reuse.KEY_FILE, reuse.key_document(
                work.experiment, {nb: {k: v for k, v in work.entry.items() if k != "outputs"}}))
        _log(f"{tag}{nb} ran in {seconds:.1f} s ({work.reason})")

    def table(self, works: Sequence[reuse.Work]) -> dict[str, Any]:
        """metrics.json's ``build``: one row per notebook, what this build did with it and why, its
        seconds in this build and when it last ran."""
        rows = [{"experiment": w.experiment, "notebook": w.notebook, "status": w.status, "reason": w.reason,
                 "seconds": w.seconds, "run_seconds": w.entry.get("seconds")} for w in works]
        reused = sum(r["status"] == reuse.REUSED for r in rows)
        # cold: every notebook of the build ran (nothing reused, no --only): only such a build's
        # seconds measure the whole-build time target
        return {"notebooks": rows, "ran": sum(r["status"] == reuse.RAN for r in rows), "reused": reused,
                "cold": reused == 0 and not getattr(self.args, "only", None)}


def _build(args, live: Path, lock: BuildLock, experiments: dict, selected: list[str],
           left_out: Mapping[str, str] | None = None) -> int:
    from bloodcell_lib.core.provenance import git_commit

    started = time.time()
    for stale in live.parent.glob(f".{live.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock)
    for stale in live.parent.glob(f".{live.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = _staging_path(live)
    failed_dir = live.parent / f"{live.name}.failed"
    staging.mkdir(parents=True)
    # Keep the other experiments' reports when only some are rebuilt; those the profile leaves out
    # too, labelled in the report as left out (with the commit their numbers come from).
    left_out = dict(left_out or {})
    earlier = [n for n in experiments if n not in selected and (live / n / RECORD_FILE).is_file()]
    kept = [n for n in earlier if n not in left_out]
    for name in earlier:
        shutil.copytree(live / name, staging / name, symlinks=True)
    kernels = Kernels(args.kernel, staging / "_logs" / "kernels.log", staging)
    _STOP["kernels"] = kernels
    steps = _Step(args, live, kernels, {n: resolved_params(experiments[n], args.profile) for n in experiments})
    steps.progress = Progress(steps.plan(selected), started)
    failures: list[NotebookFailed] = []
    _log(f"building {live} (profile {args.profile}, kernel {args.kernel}): {len(selected)} experiment(s) "
         f"{', '.join(selected)}" + (f"; keeping {', '.join(kept)}" if kept else "")
         + (f"; left out: {', '.join(left_out)} (ablations: --profile complete runs them)" if left_out else ""))
    try:
        for i, name in enumerate(selected, 1):
            out = staging / name
            (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
            try:
                works = steps.experiment(name, out, f"({i}/{len(selected)})")
                steps.done.extend(works)
                _finish_record(out, name, works, args)
            except NotebookFailed as err:
                failures.append(err)
                short = err.error if len(err.error) <= 300 else err.error[:300] + " ..."
                _log(f"({i}/{len(selected)}) {name}: FAILED in {err.notebook}: {short}")
                if not args.keep_going:
                    break
        if not failures:
            names = [n for n in experiments if (staging / n / RECORD_FILE).is_file()]
            records = load_records(staging, names)
            info = {"profile": args.profile, "git": git_commit(), "experiments_run": selected, "kept": kept,
                    "left_out": left_out, "kernel": args.kernel}
            # 04_report reads this; the final build_seconds is written once the build is done
            atomic_write_json(staging / METRICS_FILE, metrics_document(
                records, **info, build_seconds=round(time.time() - started, 1), build_finished=False,
                build=steps.table(steps.done)))
            try:
                steps.done.append(steps.report(staging, names))
            except NotebookFailed as err:
                failures.append(err)
    finally:
        _STOP["kernels"] = None
        kernels.close()

    if failures:
        shutil.rmtree(failed_dir, ignore_errors=True)
        os.rename(staging, failed_dir)
        for err in failures:
            executed = failed_dir / err.executed.relative_to(staging)
            print(f"run_all.sh: FAILED: experiment '{err.experiment}', notebook {err.notebook}\n"
                  f"  error: {err.error}\n"
                  f"  executed notebook: {executed}\n"
                  f"  as HTML: {executed.with_suffix('.html')}", file=sys.stderr)
        print(f"run_all.sh: {live} was left unchanged (the last good build, if any, is still there).",
              file=sys.stderr)
        return 1

    total = time.time() - started
    document = metrics_document(records, **info, build_seconds=round(total, 1), build_finished=True,
                                build=steps.table(steps.done))
    atomic_write_json(staging / METRICS_FILE, document)
    write_index(staging, document)
    readme = live / "README.md"
    if not readme.is_file():
        readme = PROJECT_ROOT / "reports" / "README.md"
    if readme.is_file():
        shutil.copy2(readme, staging / "README.md")
    _make_readable(staging)
    os.link(lock.path, staging / LOCK_FILE)  # same inode: the lock survives the swap
    swap_in(staging, live)
    shutil.rmtree(failed_dir, ignore_errors=True)
    build = document["build"]
    _log(f"done in {total:.1f} s ({build['ran']} notebook(s) ran, {build['reused']} reused): {live / INDEX_FILE}")
    for name in selected:
        _log(f"  {name}: " + ", ".join(f"{w.notebook} {w.status} {w.seconds:.1f} s"
                                      for w in steps.done if w.experiment == name))
    return 0


def _make_readable(root: Path) -> None:
    """Atomic writes create 0600 files; reports are meant to be read (and served) by others."""
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o044 != 0o044:
                os.chmod(path, mode | 0o044)


def experiment_notebooks(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The notebooks of one experiment: the three of every experiment, and 05_count (white cells
    counted in smear fields) where the data set has such fields (BCCD) and the model was trained on
    cell crops: the whole-field seed replica and the ablations would only repeat the detection."""
    counts = params.get("dataset") == "bccd" and params.get("crop") != "none" and not params.get("ablation_of")
    return EXPERIMENT_NOTEBOOKS + ((COUNT_NOTEBOOK,) if counts else ())


def _finish_record(out: Path, name: str, works: Sequence[reuse.Work], args) -> None:
    """The runner's part of record.json: seconds of each notebook (when it last ran) and the
    report links; the build's provenance only where this build ran a notebook (a record of
    notebooks all reused stays byte for byte as it was)."""
    path = out / RECORD_FILE
    if not path.is_file():
        raise NotebookFailed(name, "03_evaluate.ipynb", f"the notebook wrote no {RECORD_FILE}", out / "03_evaluate.ipynb")
    record = json.loads(path.read_text())
    timings = {w.notebook: w.entry.get("seconds", w.seconds) for w in works}
    updated = {**record, "total_seconds": round(sum(timings.values()), 2), "notebook_seconds": timings,
               "reports": {nb: f"{name}/{nb}.html" for nb in timings}}
    if any(w.status == reuse.RAN for w in works):
        updated["provenance"] = {**record.get("provenance", {}),
                                 "build": {"kernel": args.kernel, "profile": args.profile, "command": args.command}}
    if updated != record:
        atomic_write_json(path, updated)
