"""Sentiment labels from VADER's ground truth (Hutto & Gilbert, ICWSM 2014, MIT licence).

The movie-review snippets (10,605 sentences, each with the mean of ~20 human ratings in
-4..+4) ship inside the `vaderSentiment==3.3.2` source archive on PyPI; they are read
straight from it (a nested tar.gz), nothing is unpacked. Found at `data.path`, else
$AIGC_JAX_VADER, else ./.data/vader (where `make data` downloads it with
`pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`), else ~/.cache/aigc_jax.

Labels: 1 (positive) for a mean rating > 0, 0 for < 0; the split is fixed by a seeded
permutation, so every run and the baseline see the same held-out snippets.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile

import numpy as np

from aigc_jax.errors import UserError

ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
ENV = "AIGC_JAX_VADER"
SETS = {"movies": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
        "nyt": "nytEditorialSnippets"}
LABELS = ("negative", "positive")
SPLIT_SEED = 1234


def find_archive(path: str = "") -> str:
  """The archive at `path` (a file or a folder holding it), else in the first of
  $AIGC_JAX_VADER, ./.data/vader and ~/.cache/aigc_jax that holds it."""
  candidates = [p for p in (path, os.environ.get(ENV, ""), os.path.join(".data", "vader"),
                            os.path.expanduser("~/.cache/aigc_jax")) if p]
  for c in candidates:
    found = [c] if os.path.isfile(c) else sorted(glob.glob(os.path.join(c, "vader*.tar.gz")))
    if found:
      return found[0]
  raise UserError(f"VADER's ground truth ({ARCHIVE}) was not found in {candidates}: run "
                  "`make data`, or `pip download --no-deps --no-binary :all: "
                  f"vaderSentiment==3.3.2 -d DIR` and set data.path (or ${ENV}) to DIR")


def load_snippets(path: str = "", name: str = "movies") -> tuple[list[str], np.ndarray]:
  """(texts, ratings float32) of one VADER ground-truth set, in the file's order."""
  if name not in SETS:
    raise UserError(f"unknown VADER set {name!r}: choose one of {sorted(SETS)}")
  archive = find_archive(path)
  member = f"hutto_ICWSM_2014/{SETS[name]}_GroundTruth.txt"
  try:
    with tarfile.open(archive) as outer:
      inner_name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
      with tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner_name).read())) as inner:
        raw = inner.extractfile(member).read()
  except (tarfile.TarError, OSError, StopIteration, KeyError, EOFError) as e:
    raise UserError(f"{archive} is not the vaderSentiment 3.3.2 source archive or is "
                    f"damaged ({type(e).__name__}: {e}): download it again") from e
  texts, ratings = [], []
  for line in raw.decode("utf-8", errors="replace").splitlines():
    parts = line.split("\t", 2)
    if len(parts) == 3:
      texts.append(parts[2].strip())
      ratings.append(float(parts[1]))
  return texts, np.asarray(ratings, np.float32)


def sentiment_split(path: str = "", name: str = "movies", test_fraction: float = 0.2):
  """((train texts, labels), (test texts, labels)): neutral (0.0) ratings dropped, a fixed
  seeded split."""
  texts, ratings = load_snippets(path, name)
  keep = np.flatnonzero(ratings != 0)
  order = keep[np.random.default_rng(SPLIT_SEED).permutation(len(keep))]
  n_test = int(round(test_fraction * len(order)))
  labels = (ratings > 0).astype(np.int32)
  pick = lambda idx: ([texts[i] for i in idx], labels[idx])
  return pick(order[n_test:]), pick(order[:n_test])


def tfidf_baseline(train, test) -> float:
  """Accuracy of TF-IDF (word 1-2 grams) + logistic regression (scikit-learn) on the
  same split: the classical baseline a fine-tuned LM must beat."""
  try:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
  except ImportError as e:
    raise UserError("the TF-IDF baseline needs scikit-learn: pip install scikit-learn") from e
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
  x_train = vectorizer.fit_transform(train[0])
  clf = LogisticRegression(C=4.0, max_iter=2000).fit(x_train, train[1])
  return float((clf.predict(vectorizer.transform(test[0])) == test[1]).mean())
