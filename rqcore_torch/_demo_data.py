"""Data sets of the MiniLM demo, built at run time from the standard library's own docstrings.

Three disjoint sets of modules play three roles (nothing is downloaded, nothing third-party is read):

- *target task*: classify a function's docstring by the family of its top-level module
  (:data:`FAMILIES`);
- *preserved capability*: zero-shot retrieval of a docstring's body from its one-line summary, on the
  modules of :data:`RETRIEVAL_MODULES`;
- *calibration* (pretraining proxy): paragraphs of every docstring of :data:`CALIBRATION_MODULES`.

Docstrings depend on the Python version, so the sets do too; the demo prints their sizes and the
Python version. Items are deduplicated by text and split with a seeded permutation of the sorted
items, so a given Python and seed always give the same sets.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np

#: Target task: label = family of the function's top-level module.
FAMILIES: dict[str, tuple[str, ...]] = {
    "concurrency": (
        "asyncio",
        "threading",
        "queue",
        "subprocess",
        "selectors",
        "sched",
        "signal",
        "concurrent",
        "multiprocessing",
    ),
    "networking": (
        "imaplib",
        "smtplib",
        "poplib",
        "ftplib",
        "socket",
        "socketserver",
        "ssl",
        "http",
        "urllib",
        "email",
        "mimetypes",
        "ipaddress",
        "select",
    ),
    "debugging": (
        "inspect",
        "bdb",
        "pdb",
        "traceback",
        "doctest",
        "unittest",
        "code",
        "dis",
        "trace",
        "symtable",
        "pickletools",
        "timeit",
        "cProfile",
        "profile",
        "pstats",
    ),
    "numbers": ("math", "statistics", "random", "decimal", "fractions", "cmath", "numbers"),
    "files": (
        "shutil",
        "tempfile",
        "gzip",
        "bz2",
        "lzma",
        "zipfile",
        "tarfile",
        "pathlib",
        "filecmp",
        "fnmatch",
        "glob",
        "zlib",
        "io",
    ),
    "text": (
        "difflib",
        "textwrap",
        "unicodedata",
        "re",
        "codecs",
        "base64",
        "binascii",
        "string",
        "locale",
    ),
}

#: Preserved capability: summary → body retrieval on these modules' docstrings.
RETRIEVAL_MODULES: tuple[str, ...] = (
    "builtins",
    "typing",
    "logging",
    "collections",
    "itertools",
    "functools",
    "configparser",
    "argparse",
    "optparse",
    "json",
    "sqlite3",
    "datetime",
    "time",
    "platform",
    "sys",
    "os",
    "posix",
    "contextlib",
    "dataclasses",
    "array",
    "weakref",
    "enum",
    "operator",
    "copy",
    "heapq",
    "graphlib",
    "uuid",
    "warnings",
    "pkgutil",
    "zipimport",
    "importlib",
    "gc",
)

#: Pretraining proxy: paragraphs of every docstring of these modules (generic technical English).
CALIBRATION_MODULES: tuple[str, ...] = (
    "abc",
    "ast",
    "atexit",
    "bisect",
    "calendar",
    "cmd",
    "codeop",
    "colorsys",
    "compileall",
    "contextvars",
    "copyreg",
    "csv",
    "ctypes",
    "dbm",
    "getopt",
    "getpass",
    "gettext",
    "hashlib",
    "hmac",
    "html",
    "keyword",
    "linecache",
    "mailbox",
    "marshal",
    "mmap",
    "netrc",
    "pickle",
    "plistlib",
    "pprint",
    "py_compile",
    "pydoc",
    "quopri",
    "reprlib",
    "rlcompleter",
    "runpy",
    "secrets",
    "shelve",
    "shlex",
    "site",
    "stat",
    "struct",
    "sysconfig",
    "tabnanny",
    "tokenize",
    "tomllib",
    "tracemalloc",
    "types",
    "webbrowser",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zipapp",
    "zoneinfo",
)


# Builtins' first line is often a signature ("getsizeof(object [, default]) -> int"), not a summary.
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


@dataclass(frozen=True)
class Docstring:
    """One callable's docstring, split into its one-line summary and its body."""

    qualname: str
    module: str
    summary: str
    body: str

    @property
    def text(self) -> str:
        """Summary and body, as the classification task reads them."""
        return f"{self.summary}\n\n{self.body}"


@dataclass(frozen=True)
class DemoData:
    """The three tasks' splits (lists of strings and labels)."""

    families: tuple[str, ...]
    train_texts: list[str]
    train_labels: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    retrieval_val: tuple[list[str], list[str]]
    retrieval_test: tuple[list[str], list[str]]
    calibration: list[str]

    def summary(self) -> str:
        """One line per set: what it holds and how large it is."""
        counts = np.bincount(self.train_labels, minlength=len(self.families))
        return "\n".join(
            [
                f"Python {sys.version.split()[0]} standard-library docstrings:",
                f"  target task: {len(self.families)} module families "
                f"({', '.join(f'{f} {c}' for f, c in zip(self.families, counts, strict=True))} train); "
                f"train/val/test {len(self.train_texts)}/{len(self.val_texts)}/"
                f"{len(self.test_texts)} functions",
                f"  preserved: summary→body retrieval on {len(RETRIEVAL_MODULES)} other modules; "
                f"val/test {len(self.retrieval_val[0])}/{len(self.retrieval_test[0])} pairs "
                "(each query ranks all bodies of its split)",
                f"  calibration: {len(self.calibration)} docstring paragraphs of "
                f"{len(CALIBRATION_MODULES)} further modules ({', '.join(CALIBRATION_MODULES[:6])}, …)",
            ]
        )


def _import_quietly(name: str) -> ModuleType | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # absent on this platform/build (e.g. posix on Windows)
            return None


def _owned(obj: object, top: str) -> bool:
    mod = getattr(obj, "__module__", None)
    return isinstance(mod, str) and (mod == top or mod.startswith(top + "."))


def _callables(module: ModuleType, top: str) -> Iterator[tuple[str, object]]:
    """Public functions, classes and methods defined in ``top`` (or its submodules)."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if not (_owned(obj, top) or (top in ("builtins", "posix") and callable(obj))):
            continue
        yield f"{top}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    yield f"{top}.{name}.{attr}", member


def _split_docstring(doc: str) -> tuple[str, str] | None:
    parts = doc.strip().split("\n\n", 1)
    if len(parts) != 2:
        return None
    summary = " ".join(parts[0].split())
    body = " ".join(parts[1].split())
    if len(summary) < 12 or len(body) < 30 or summary.endswith(":") or _SIGNATURE.match(summary):
        return None
    return summary, body


def docstrings(modules: Iterable[str]) -> list[Docstring]:
    """Every public callable's docstring with a summary and a body, deduplicated, sorted by name."""
    with warnings.catch_warnings():  # reading deprecated aliases (typing.io, …) warns
        warnings.simplefilter("ignore")
        return _docstrings(modules)


def _docstrings(modules: Iterable[str]) -> list[Docstring]:
    out: dict[str, Docstring] = {}
    seen: set[str] = set()
    for top in modules:
        module = _import_quietly(top)
        if module is None:
            continue
        for qualname, obj in _callables(module, top):
            doc = inspect.getdoc(obj)
            split = _split_docstring(doc) if doc else None
            if split is None or split[0] in seen or split[1] in seen:
                continue
            seen.update(split)
            out[qualname] = Docstring(qualname, top, *split)
    return [out[q] for q in sorted(out)]


def paragraphs(modules: Iterable[str], min_chars: int = 60) -> list[str]:
    """Paragraphs of every docstring (module, class, function) of ``modules``, deduplicated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _paragraphs(modules, min_chars)


def _paragraphs(modules: Iterable[str], min_chars: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for top in modules:
        module = _import_quietly(top)
        if module is None:
            continue
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in _callables(module, top)]
        for doc in docs:
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= min_chars and text not in seen and not text.startswith(">>>"):
                    seen.add(text)
                    out.append(text)
    return out


def _split(n: int, fractions: tuple[float, float], rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    return [order[:a], order[a:b], order[b:]]


def build(
    seed: int = 0,
    *,
    max_per_family: int | None = None,
    max_retrieval: int | None = None,
    max_calibration: int | None = None,
) -> DemoData:
    """Build the demo's data sets from this interpreter's standard library.

    Parameters
    ----------
    seed : int
        Seed of the splits and of the subsampling below.
    max_per_family : int, optional
        Cap on functions per family (the largest families are subsampled; balances the classes).
    max_retrieval : int, optional
        Cap on retrieval pairs per split (val and test).
    max_calibration : int, optional
        Cap on calibration paragraphs.

    Returns
    -------
    DemoData
    """
    rng = np.random.default_rng(seed)
    families = tuple(FAMILIES)
    texts: list[str] = []
    labels: list[int] = []
    for label, family in enumerate(families):
        items = docstrings(FAMILIES[family])
        if max_per_family is not None and len(items) > max_per_family:
            keep = np.sort(rng.choice(len(items), max_per_family, replace=False))
            items = [items[i] for i in keep]
        texts += [d.text for d in items]
        labels += [label] * len(items)
    y = np.asarray(labels, dtype=np.int64)
    tr, va, te = _split(len(texts), (0.6, 0.15), rng)

    pairs = docstrings(RETRIEVAL_MODULES)
    r_val, r_test, _ = _split(len(pairs), (0.5, 0.5), rng)
    if max_retrieval is not None:
        r_val, r_test = r_val[:max_retrieval], r_test[:max_retrieval]

    calib = paragraphs(CALIBRATION_MODULES)
    if max_calibration is not None and len(calib) > max_calibration:
        calib = [calib[i] for i in np.sort(rng.choice(len(calib), max_calibration, replace=False))]

    def pick(idx: np.ndarray) -> tuple[list[str], list[str]]:
        return [pairs[i].summary for i in idx], [pairs[i].body for i in idx]

    return DemoData(
        families=families,
        train_texts=[texts[i] for i in tr],
        train_labels=y[tr],
        val_texts=[texts[i] for i in va],
        val_labels=y[va],
        test_texts=[texts[i] for i in te],
        test_labels=y[te],
        retrieval_val=pick(r_val),
        retrieval_test=pick(r_test),
        calibration=calib,
    )
