"""The Python standard library's own documentation as a retrieval corpus, real and offline.

Passages (`stdlib_passages`), in a fixed order with unique ids:
  * every public, documented function, class and method of the standard library modules
    importable here: "module.qualname(signature): docstring". Modules come from
    `sys.stdlib_module_names` and the packages' submodules, sorted by name; skipped are
    private names (a part starting with '_'), test packages, modules with side effects on
    import (SKIP_MODULES: `antigravity` opens a browser, `this` prints, `lib2to3` writes
    grammar pickles, `readline` takes the terminal, Tk and IDLE), `distutils` (setuptools
    replaces it), and copies outside the standard library's folder. A module that fails
    to import (another platform's, a missing C library) is counted, not fatal. A module
    owns what it defines (`__module__`) and what its `__all__` re-exports from a C or
    private implementation (`os.getcwd` from `posix`, `io.open` from `_io`); the first
    module to claim an object keeps it. Objects that code outside the standard library
    put in its modules are left out, and a hook the host replaced is read from the
    module's original (pytest swaps `threading.excepthook`; `threading.__excepthook__`
    is kept), so the corpus is the same under a test runner. Methods: a class's own
    public methods (no dunders, no inherited ones). A docstring seen before (an override
    that repeats its base's) is dropped, so is one without text. Docstrings are cut at
    MAX_WORDS words (~8% of passages are longer than 256 MiniLM tokens even so) and
    signatures at MAX_SIGNATURE_CHARS characters, without annotations and with defaults
    other than short literals shown as '...' (their reprs can hold memory addresses, set
    orders that follow the hash seed, or the environment).
  * `pydoc_data.topics` (the help() topics, the language reference's prose): one passage
    per TOPIC_WORDS words of each topic, "TOPIC (part i/n): text".

`retrieval_pairs` turns functions into (query, passage id) pairs: the query is the
docstring's summary (its first sentence), and the passage is the function's with that
summary removed; left in, the query would be a substring of its passage and retrieval
trivial. The other passages stay whole, as distractors. Only summaries of at least
MIN_QUERY_WORDS words that no other passage shares make pairs; about half the paired
passages are then just their title (a one-sentence docstring), which the query has to
match by name and signature. Pairs are split train / held-out by a seeded hash of the
top-level package, so no held-out module, nor its package, is seen in training.

On CPython 3.11.7 (Linux): 5,429 passages (5,064 API, 365 help-topic parts) from 476
modules (12 failed to import, 136 skipped) in ~0.5-1 s; 3,592 train and 776 held-out
pairs at val_fraction=0.2, seed=0. Other Python versions give other counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

from aigc_jax.errors import UserError

MAX_WORDS = 250  # a docstring's words kept in its passage (an encoder reads ~256 tokens)
MAX_SIGNATURE_CHARS = 200
TOPIC_WORDS = 200  # words per help-topic passage
MIN_QUERY_WORDS = 4  # shorter summaries ('Return self.') say too little to be queries
TOPICS_MODULE = "pydoc_data.topics"
# Importing these does something (opens a browser, prints, writes files, grabs the
# terminal or a display) or needs a GUI.
SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
    "readline", "rlcompleter", "ensurepip", "venv", "distutils", "test", "xxlimited",
    "xxlimited_35", "xxsubtype"})
TEST_PARTS = frozenset({"test", "tests", "idle_test"})
# A first paragraph that only shows the call ('sub(a, b) -- ...' is not; 'S.count(sub) ->
# int' is), as C functions' docstrings often start.
_CALL_LINE = re.compile(r"^[\w.]+\(.*\)(\s*-+>\s*.*)?$", re.S)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclasses.dataclass(frozen=True)
class Passage:
  """One passage: id ('json.dumps', 'json.JSONDecoder.decode', 'topic:assert#0'), title
  (the qualified name with its signature, or the topic and part), text ('title: body'),
  module (the owning module; TOPICS_MODULE for help topics) and summary (the docstring's
  first sentence, whitespace collapsed; '' for topics)."""

  id: str
  title: str
  text: str
  module: str
  summary: str = ""


class Corpus(NamedTuple):
  """`stdlib_passages`' result: the passages, the modules read, those that failed to
  import (name -> error type), those skipped on purpose, and the seconds it took."""

  passages: list[Passage]
  modules: list[str]
  failed: dict[str, str]
  skipped: list[str]
  seconds: float


class Pairs(NamedTuple):
  """`retrieval_pairs`' result: (query, passage id) pairs for training and held out, and
  the collection to retrieve from (every passage; those of paired functions without their
  summary)."""

  train: list[tuple[str, str]]
  held_out: list[tuple[str, str]]
  passages: list[Passage]


# --- the corpus -------------------------------------------------------------------------
def stdlib_passages(max_words: int = MAX_WORDS, topic_words: int = TOPIC_WORDS) -> Corpus:
  """The standard library's documented API and help topics as passages (module
  docstring); deterministic for one Python build."""
  if max_words < 1 or topic_words < 1:
    raise UserError(f"max_words={max_words} and topic_words={topic_words} must be >= 1")
  start = time.perf_counter()
  modules, failed, skipped = _import_stdlib()
  passages, claimed, docs = [], set(), set()
  with warnings.catch_warnings():  # reading some names warns (typing.io is deprecated)
    warnings.simplefilter("ignore")
    for module in modules:
      passages += _module_passages(module, claimed, docs, max_words)
  passages += _topic_passages(topic_words)
  ids = [p.id for p in passages]
  if len(set(ids)) != len(ids):  # names are unique per namespace: a bug here if not
    raise ValueError("duplicate passage ids in the standard-library corpus")
  return Corpus(passages, [m.__name__ for m in modules], failed, skipped,
                time.perf_counter() - start)


def _stdlib_dir() -> str:
  return os.path.realpath(sysconfig.get_path("stdlib"))


def _in_stdlib(module, stdlib: str) -> bool:
  """A C module built in, or a file under the standard library's folder (not a
  site-packages copy that shadows it)."""
  path = getattr(module, "__file__", None)
  if path is None:
    return True
  path = os.path.realpath(path)
  return path.startswith(stdlib + os.sep) and "site-packages" not in path[len(stdlib):]


def _skipped(name: str) -> bool:
  parts = name.split(".")
  return (parts[0] in SKIP_MODULES or any(p.startswith("_") for p in parts)
          or any(p in TEST_PARTS for p in parts))


def _import_stdlib():
  """(modules sorted by name, {failed name: error}, [skipped names])."""
  stdlib = _stdlib_dir()
  names = sorted(set(sys.stdlib_module_names))
  modules, failed, skipped = {}, {}, []
  todo = list(reversed(names))
  # Deprecated modules warn on import; some print while importing (none of the kept ones
  # should, but stdout belongs to the caller).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    while todo:
      name = todo.pop()
      if _skipped(name):
        skipped.append(name)
        continue
      try:
        with _quiet():
          module = importlib.import_module(name)
      except Exception as e:  # noqa: BLE001 - another platform's module, a missing library
        failed[name] = type(e).__name__
        continue
      if not _in_stdlib(module, stdlib):
        skipped.append(name)
        continue
      modules[name] = module
      if hasattr(module, "__path__"):
        todo += sorted((f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)),
                       reverse=True)
  return [modules[n] for n in sorted(modules)], failed, sorted(skipped)


class _quiet:
  """Swallows what an import writes to stdout / stderr."""

  def __enter__(self):
    self.saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()

  def __exit__(self, *exc):
    sys.stdout, sys.stderr = self.saved
    return False


def _shown_name(name: str) -> str:
  # posixpath (ntpath on Windows) is what everyone calls os.path.
  return "os.path" if name == os.path.__name__ else name


def _private_origin(origin: str | None) -> bool:
  """An implementation module that re-exporting modules stand in for ('_io', 'posix'), or
  none (`random.random`, a bound method of the module's hidden Random)."""
  return (origin is None or any(p.startswith("_") for p in origin.split("."))
          or origin in ("posix", "nt"))


def _module_members(module):
  """(name, object) of the module's public functions and classes that it owns."""
  name = module.__name__
  exported = getattr(module, "__all__", None)
  exported = ({n for n in exported if isinstance(n, str)}
              if isinstance(exported, (list, tuple)) else set())
  for attr in sorted(set(vars(module)) | exported):
    if attr.startswith("_"):
      continue
    # A hook the host may have replaced (pytest sets threading.excepthook and
    # sys.unraisablehook): the module keeps the original as __name__.
    original = getattr(module, f"__{attr}__", None) if attr.endswith("hook") else None
    obj = original if inspect.isroutine(original) else getattr(module, attr, None)
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    origin = getattr(obj, "__module__", None)  # None for C methods bound to an instance
    if isinstance(origin, str) and origin.split(".")[0] not in sys.stdlib_module_names:
      continue  # put there by someone else (a debugger's patched pdb.set_trace)
    if origin == name or (attr in exported and _private_origin(origin)):
      yield attr, obj


def _class_methods(cls):
  """(name, function) of the class's own public methods, in definition order."""
  for attr, member in vars(cls).items():
    if attr.startswith("_"):
      continue
    if isinstance(member, (staticmethod, classmethod)):
      member = member.__func__
    if inspect.isroutine(member):
      yield attr, member


class _Elided:
  """A default shown as '...'."""

  def __repr__(self) -> str:
    return "..."


def _shown_default(value):
  """Literals as written; any other default as '...': its repr can hold memory addresses,
  set orders that change with the hash seed, or the environment (cgi's `environ`)."""
  simple = value is None or isinstance(value, (bool, int, float))
  short = isinstance(value, (str, bytes)) and len(value) <= 40
  empty = isinstance(value, (tuple, list, dict)) and not value
  return value if simple or short or empty else _Elided()


def _signature(obj) -> str:
  """'(a, b=1, *, c=...)': annotations dropped, defaults as `_shown_default`; '(...)' when
  there is none to read."""
  try:
    sig = inspect.signature(obj)
  except Exception:  # noqa: BLE001 - C callables without a text signature, odd __signature__
    return "(...)"
  empty = inspect.Parameter.empty
  params = [p.replace(annotation=empty,
                      default=empty if p.default is empty else _shown_default(p.default))
            for p in sig.parameters.values()]
  text = str(sig.replace(parameters=params, return_annotation=empty))
  return (text if len(text) <= MAX_SIGNATURE_CHARS
          else text[:MAX_SIGNATURE_CHARS - 4] + " ...)")


def _module_passages(module, claimed: set, docs: set, max_words: int) -> list[Passage]:
  shown = _shown_name(module.__name__)
  out = []

  def add(qualname: str, obj) -> None:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    doc = inspect.cleandoc(doc).strip()
    if not doc or doc in docs:
      return
    docs.add(doc)
    title = f"{shown}.{qualname}{_signature(obj)}"
    out.append(Passage(id=f"{shown}.{qualname}", title=title,
                       text=f"{title}: {_first_words(doc, max_words)}", module=shown,
                       summary=" ".join(split_summary(doc)[0].split())))

  for attr, obj in _module_members(module):
    if id(obj) in claimed:
      continue
    claimed.add(id(obj))
    add(attr, obj)
    if inspect.isclass(obj):
      for method, fn in _class_methods(obj):
        if id(fn) not in claimed:
          claimed.add(id(fn))
          add(f"{attr}.{method}", fn)
  return out


def _topic_passages(words_per_passage: int) -> list[Passage]:
  try:
    from pydoc_data.topics import topics
  except ImportError:  # a Python built without its docs: the API passages alone
    return []
  out = []
  for topic in sorted(topics):
    words = topics[topic].split()
    parts = max(1, -(-len(words) // words_per_passage))
    for i in range(parts):
      title = f"{topic} (part {i + 1}/{parts})"
      body = " ".join(words[i * words_per_passage:(i + 1) * words_per_passage])
      out.append(Passage(id=f"topic:{topic}#{i}", title=title, text=f"{title}: {body}",
                         module=TOPICS_MODULE))
  return out


def _first_words(text: str, n: int) -> str:
  """`text` through its n-th word, line breaks kept; ' ...' marks a cut."""
  ends = [m.end() for m in re.finditer(r"\S+", text)]
  return text if len(ends) <= n else text[:ends[n - 1]] + " ..."


def split_summary(doc: str) -> tuple[str, str]:
  """(summary, rest) of a cleaned docstring: the summary is the first sentence of the
  first paragraph that is not just a call line ('S.count(sub) -> int'); rest is the
  docstring without it. ('', doc) when there is no such paragraph."""
  pos = 0
  for para in re.finditer(r"\S.*?(?=\n\s*\n|\Z)", doc, re.S):
    if _CALL_LINE.match(para.group()):
      continue
    end = _SENTENCE_END.search(para.group())
    pos, stop = para.start(), para.start() + (end.end() if end else len(para.group()))
    return doc[pos:stop], (doc[:pos] + doc[stop:].lstrip()).strip()
  return "", doc


# --- retrieval pairs --------------------------------------------------------------------
def held_out_package(module: str, val_fraction: float, seed: int) -> bool:
  """Whether `module`'s top-level package falls in the held-out share (a seeded hash, so
  the split is the same in every process and for every Python hash seed)."""
  top = module.split(".")[0]
  digest = hashlib.sha256(f"{seed}:{top}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def retrieval_pairs(passages: Sequence[Passage], val_fraction: float = 0.2, seed: int = 0
                    ) -> Pairs:
  """(query, passage id) pairs of the functions, classes and methods whose summary has
  at least MIN_QUERY_WORDS words and is no other passage's summary (an ambiguous query
  has no single answer); the paired passages lose their summary (module docstring).
  Split by a seeded hash of the top-level package: `val_fraction` of the packages are
  held out."""
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"val_fraction={val_fraction} must lie in (0, 1): the share of "
                    "packages whose functions are held out")
  counts: dict[str, int] = {}
  for p in passages:
    if p.summary:
      counts[p.summary] = counts.get(p.summary, 0) + 1
  train, held_out, out = [], [], []
  for p in passages:
    query = p.summary
    if p.module == TOPICS_MODULE or len(query.split()) < MIN_QUERY_WORDS or counts[query] > 1:
      out.append(p)
      continue
    summary, rest = split_summary(p.text[len(p.title) + 2:])  # the body, cut at max_words
    text = f"{p.title}: {rest}" if rest else p.title
    # A first sentence longer than max_words, or said twice: no fair pair.
    if " ".join(summary.split()) != query or query in " ".join(text.split()):
      out.append(p)
      continue
    out.append(dataclasses.replace(p, text=text))
    (held_out if held_out_package(p.module, val_fraction, seed) else train).append((query, p.id))
  return Pairs(train, held_out, out)


def summary_counts(corpus: Corpus, pairs: Pairs) -> dict:
  """The figures to report: passages by kind, modules read / failed / skipped, pairs
  train / held-out, build seconds."""
  topics = sum(p.module == TOPICS_MODULE for p in corpus.passages)
  return {"passages": len(corpus.passages), "api_passages": len(corpus.passages) - topics,
          "topic_passages": topics, "modules": len(corpus.modules),
          "failed_imports": len(corpus.failed), "skipped_modules": len(corpus.skipped),
          "train_pairs": len(pairs.train), "held_out_pairs": len(pairs.held_out),
          "seconds": round(corpus.seconds, 2)}
