"""What a build may take from the last one instead of running it again (``run_all.sh``).

Every notebook a build runs is a piece of work with a key: a sha256 over its inputs, one hash
per kind of input (COMPONENTS): the resolved parameters papermill is given (``config``, the
profile apart), the library's source, ``requirements.lock``, the notebook file, the data it
reads (path relative to its data set, size and mtime of every file: no image is read) and
the keys of the work it depends on (``parent``: within an experiment 03/05 on 02_train, 05 on
03_evaluate; 02_train on the 02_train of the experiment ``init_from`` names; 04_report on
every notebook of every experiment it reports). A parent's key is part of the child's, so a
changed parent changes every key downstream, and a parent that ran in this build makes its
children run too (``decide``). The key of each notebook and the files it wrote are kept in
``build_key.json`` beside its outputs (``<reports>/<experiment>/``, ``<reports>/`` for
04_report, and the run folder for 02_train's checkpoint). Hand-written and small on purpose:
DEVELOPERS.md says why no pipeline tool.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import bloodcell_lib
from bloodcell_lib.core.fileio import sha256_file
from bloodcell_lib.core.paths import NOTEBOOKS_DIR, PROJECT_ROOT

KEY_FILE = "build_key.json"
KEY_FORMAT = "bloodcell-build-key"
# The kinds of input, in the order a "ran" line names the changed ones.
COMPONENTS = ("config", "profile", "library", "lock", "notebook", "data", "parent")
REPORT_EXPERIMENT = "(all)"  # the experiment column of 04_report, which runs once per build
PACKAGE_DIR = Path(bloodcell_lib.__file__).resolve().parent
LOCK_PATH = PROJECT_ROOT / "requirements.lock"
TRAIN, EVALUATE, COUNT = "02_train", "03_evaluate", "05_count"
# Within one experiment: which notebooks read what another one wrote (its checkpoint, its record).
WITHIN = {EVALUATE: (TRAIN,), COUNT: (TRAIN, EVALUATE)}
REUSED, RAN = "reused", "ran"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tree_fingerprint(folder: Path) -> str:
    """(relative path, size, mtime_ns) of every file under ``folder``, hashed ("missing" if none)."""
    if not folder.exists():
        return "missing"
    if folder.is_file():
        st = folder.stat()
        return digest([folder.name, st.st_size, st.st_mtime_ns])
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:  # a dangling link reads as absent
                continue
            entries.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return digest(sorted(entries))


class Fingerprints:
    """The hashes of one build, each computed once: library, lock, notebooks, data folders."""

    def __init__(self, *, package_dir: Path = PACKAGE_DIR, lock_path: Path = LOCK_PATH,
                 notebooks_dir: Path = NOTEBOOKS_DIR):
        self.package_dir, self.lock_path, self.notebooks_dir = Path(package_dir), Path(lock_path), Path(notebooks_dir)
        self._memo: dict[tuple, str] = {}

    def _once(self, key: tuple, compute: Callable[[], str]) -> str:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def library(self) -> str:
        """Content of every file of the package (.py, .yaml, .j2, ...) by relative path."""
        def compute() -> str:
            files = sorted(p for p in self.package_dir.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))
            return digest([(p.relative_to(self.package_dir).as_posix(), sha256_file(p)) for p in files])
        return self._once(("library",), compute)

    def lock(self) -> str:
        return self._once(("lock",), lambda: sha256_file(self.lock_path) if self.lock_path.is_file() else "missing")

    def notebook(self, name: str) -> str:
        path = self.notebooks_dir / f"{name}.ipynb"
        return self._once(("notebook", name), lambda: sha256_file(path) if path.is_file() else "missing")

    def folder(self, path: Path) -> str:
        return self._once(("folder", str(path)), lambda: tree_fingerprint(Path(path)))

    def data_set(self, name: str, root: str | None = None) -> str:
        """A named data set's folder as ``datasets.locate`` finds it (under ``root`` or the data roots)."""
        from bloodcell_lib.core.paths import DataNotFoundError
        from bloodcell_lib.data.datasets import locate

        try:
            folder = locate(name, root)
        except DataNotFoundError:
            return "missing"
        return self.folder(folder)

    def data(self, params: Mapping[str, Any], notebook: str) -> str:
        return digest({label: fingerprint() for label, fingerprint in data_needs(params, notebook, self)})


def data_needs(params: Mapping[str, Any], notebook: str, fp: Fingerprints) -> list[tuple[str, Callable[[], str]]]:
    """(label, fingerprint) of each folder a notebook reads: the experiment's own sets (its
    ``dataset`` or ``sources``, ``extra_train``, ``test_source``; a ``folder`` set's
    ``data_dir``, a ``csv`` set's folder); 03_evaluate also every other named set (cross-lab
    scores and strangers); 05_count BCCD's smear fields; 04_report none."""
    from bloodcell_lib.data.datasets import LAYOUTS

    if notebook not in (*WITHIN, "01_explore", TRAIN):
        return []
    dataset, root = params.get("dataset"), params.get("data_dir")
    named = set(params.get("sources") or []) if dataset == "multi" else set()
    named |= {n for n in (params.get("extra_train"), params.get("test_source")) if n}
    needs: dict[str, Callable[[], str]] = {}
    if dataset in LAYOUTS:
        needs[f"{dataset}@{root or ''}"] = lambda: fp.data_set(dataset, root)
    elif dataset in ("folder", "csv"):
        for path in {root, str(Path(params["csv_path"]).expanduser().parent) if params.get("csv_path") else None} - {None}:
            needs[f"tree:{path}"] = lambda path=path: fp.folder(Path(path).expanduser().absolute())
    if notebook == EVALUATE:
        named |= set(LAYOUTS)
    elif notebook == COUNT:
        named.add("bccd")
    for name in named & set(LAYOUTS):
        needs.setdefault(f"{name}@", lambda name=name: fp.data_set(name))
    return sorted(needs.items())


@dataclass
class Work:
    """One notebook of one experiment (or 04_report): its inputs, key and what it waits for."""

    experiment: str
    notebook: str
    inputs: dict[str, str]
    depends_on: tuple[tuple[str, str], ...] = ()
    forced: bool = False
    status: str = ""
    reason: str = ""
    seconds: float = 0.0  # this build
    entry: dict[str, Any] = field(default_factory=dict)  # what build_key.json keeps

    @property
    def key(self) -> str:
        return digest(self.inputs)


def inputs(fp: Fingerprints, notebook: str, params: Mapping[str, Any], parents: Mapping[str, str | None],
           data: str | None = None) -> dict[str, str]:
    config = {k: v for k, v in params.items() if k != "profile"}
    return {"config": digest(config), "profile": str(params.get("profile")), "library": fp.library(),
            "lock": fp.lock(), "notebook": fp.notebook(notebook),
            "data": data if data is not None else fp.data(params, notebook), "parent": digest(dict(parents))}


def experiment_work(fp: Fingerprints, name: str, params: Mapping[str, Any], notebooks: Sequence[str],
                    keys: Mapping[tuple[str, str], str | None],
                    recorded: Callable[[str, str], str | None]) -> list[Work]:
    """The work of one experiment. ``keys``: (experiment, notebook) -> key of work planned earlier
    in this build; ``recorded(experiment, notebook)`` the key kept by an earlier build (a parent
    this build does not run); an ``init_from`` checkpoint file counts by size and mtime."""
    works: list[Work] = []
    planned = dict(keys)
    source = params.get("init_from")
    for nb in notebooks:
        deps = [(name, other) for other in WITHIN.get(nb, ()) if other in notebooks]
        parents: dict[str, str | None] = {}
        if nb == TRAIN and source:
            if str(source).endswith(".pt"):
                parents["init_from"] = fp.folder(Path(source).expanduser().absolute())
            else:
                deps.append((source, TRAIN))
        for dep in deps:
            parents["/".join(dep)] = planned[dep] if dep in planned else recorded(*dep)
        work = Work(name, nb, inputs(fp, nb, params, parents), tuple(deps))
        planned[(name, nb)] = work.key
        works.append(work)
    return works


def report_work(fp: Fingerprints, notebook: str, params: Mapping[str, Any],
                experiment_keys: Mapping[tuple[str, str], str | None]) -> Work:
    """04_report: its parameters, and every notebook key of the experiments it reports."""
    parents = {"/".join(k): v for k, v in sorted(experiment_keys.items())}
    return Work(REPORT_EXPERIMENT, notebook, inputs(fp, notebook, params, parents, data=digest({})),
                tuple(experiment_keys))


def decide(work: Work, previous: Mapping[str, Any] | None, *, outputs_present: bool,
           ran: Iterable[tuple[str, str]] = ()) -> tuple[str, str]:
    """(REUSED or RAN, why). Runs when forced (--rebuild), when the last build left no output,
    when an input changed (naming which kinds), or when work it depends on ran in this build."""
    if work.forced:
        return RAN, "--rebuild"
    if previous is None or not outputs_present:
        return RAN, "no previous output"
    if previous.get("key") != work.key:
        before = previous.get("inputs") or {}
        changed = [c for c in COMPONENTS if before.get(c) != work.inputs.get(c)]
        return RAN, ", ".join(changed) or "key"
    ran = set(ran)
    reran = [f"{e}/{n}" if e != work.experiment else n for e, n in work.depends_on if (e, n) in ran]
    if reran:
        more = f" and {len(reran) - 3} more" if len(reran) > 3 else ""
        return RAN, f"parent ({', '.join(reran[:3])}{more} ran)"
    return REUSED, "key matched"


# --------------------------------------------------------------------------- build_key.json

def read_keys(folder: Path) -> dict[str, dict[str, Any]]:
    """notebook -> entry (key, inputs, outputs, seconds) of ``folder/build_key.json``; {} if none."""
    try:
        document = json.loads((Path(folder) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    notebooks = document.get("notebooks") if isinstance(document, dict) else None
    return notebooks if isinstance(notebooks, dict) else {}


def key_document(experiment: str, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"format": KEY_FORMAT, "version": 1, "experiment": experiment, "notebooks": dict(entries)}


def entry(work: Work, outputs: Sequence[str], seconds: float) -> dict[str, Any]:
    """What build_key.json keeps of work that ran: its key and inputs, the files it wrote, its seconds."""
    return {"key": work.key, "inputs": dict(work.inputs), "outputs": list(outputs), "seconds": round(seconds, 2)}


def file_states(folder: Path, skip: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``folder`` but build_key.json and
    the top-level entries named in ``skip``."""
    skip = {KEY_FILE, *skip}
    states = {}
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in files:
            st = Path(root, name).stat()
            states[(rel_root / name).as_posix()] = (st.st_size, st.st_mtime_ns)
    return states


def written(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]) -> list[str]:
    """Files new or changed between two ``file_states``: what a notebook wrote."""
    return sorted(path for path, state in after.items() if before.get(path) != state)


def outputs_present(folder: Path, previous: Mapping[str, Any] | None, notebook: str) -> bool:
    """The last build's outputs of a notebook are all still in ``folder`` (its executed notebook
    and HTML among them)."""
    if not previous:
        return False
    outputs = set(previous.get("outputs") or [])
    if not {f"{notebook}.ipynb", f"{notebook}.html"} <= outputs:
        return False
    return all((Path(folder) / rel).is_file() for rel in outputs)


def copy_outputs(source: Path, target: Path, outputs: Iterable[str]) -> None:
    """The files a reused notebook wrote, from the live reports into staging, bytes and mtime kept."""
    for rel in outputs:
        destination = Path(target) / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source) / rel, destination)


def checkpoint_present(run_dir: Path) -> bool:
    """The run's kept checkpoint: at the top, or in every fold of a cross-validated run."""
    from bloodcell_lib.modeling.rundir import RunDir

    run = RunDir(run_dir)
    if run.checkpoint_best.is_file():
        return True
    folds = run.folds()
    return bool(folds) and all(fold.checkpoint_best.is_file() for fold in folds)
