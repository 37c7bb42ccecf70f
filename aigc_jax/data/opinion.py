"""Three-way opinion labels (negative / neutral / positive) for monitoring news and posts,
from VADER's ground truth (Hutto & Gilbert, ICWSM 2014): the NYT editorial snippets
(5,190) and the tweets (4,200) pooled, each with the mean of ~20 human ratings in -4..+4,
read by `aigc_jax.data.sentiment` from the vaderSentiment 3.3.2 source archive.

Thresholds on the mean rating: negative < -0.5, positive > +0.5, neutral otherwise (both
ends inclusive). Why 0.5: the ratings are integers -4..+4 and raters disagree (a median
standard deviation of 0.74 per NYT snippet, 0.80 per tweet, over 20 raters), so a mean
carries a median standard error of ~0.16; within +-0.5 (~3 standard errors) a snippet is
not clearly on either side of 0. It also gives each class a fair share of the pooled,
deduplicated set of 9,319: 2,724 negative, 3,210 neutral, 3,385 positive (NYT 1,662 / 2,372
/ 1,085, tweets 1,062 / 838 / 2,300). VADER's own +-0.05 applies to its compound score in
-1..1, not to human means: on these means it leaves 7% neutral (683 of 9,390), and a
snippet rated 0.1 by 20 people is neutral by any reading.

Identical texts (71 repeated NYT snippets, rated separately) are kept once with the mean of
their ratings, so no text is in two parts of the split. The split is stratified by class
and fixed by a seeded permutation: every run and the baseline see the same held-out texts.
"""

from __future__ import annotations

import numpy as np

from aigc_jax.data.sentiment import load_snippets
from aigc_jax.errors import UserError

LABELS = ("negative", "neutral", "positive")
NEGATIVE_BELOW = -0.5  # mean rating < this: negative
POSITIVE_ABOVE = 0.5  # mean rating > this: positive
SOURCES = ("nyt", "tweets")
SPLIT_SEED = 2314


def rating_labels(ratings) -> np.ndarray:
  """Mean ratings [N] (-4..+4) -> labels int32 [N]: 0 negative, 1 neutral, 2 positive."""
  ratings = np.asarray(ratings, np.float64)
  return np.where(ratings < NEGATIVE_BELOW, 0, np.where(ratings > POSITIVE_ABOVE, 2, 1)
                  ).astype(np.int32)


def load_opinions(path: str = "") -> tuple[list[str], np.ndarray, np.ndarray]:
  """(texts, mean ratings float32 [N], sources [N] of 'nyt' / 'tweets') of NYT + tweets,
  identical texts kept once (at their first place, with the mean of their ratings)."""
  where: dict[str, int] = {}
  texts, sums, counts, sources = [], [], [], []
  for source in SOURCES:
    for text, rating in zip(*load_snippets(path, source), strict=True):
      i = where.setdefault(text, len(texts))
      if i == len(texts):
        texts.append(text)
        sums.append(0.0)
        counts.append(0)
        sources.append(source)
      sums[i] += float(rating)
      counts[i] += 1
  ratings = (np.asarray(sums) / np.asarray(counts)).astype(np.float32)
  return texts, ratings, np.asarray(sources)


def opinion_split(path: str = "", test_fraction: float = 0.2,
                  val_fraction: float = 0.1) -> dict:
  """{'train' | 'val' | 'test': {'texts': list[str], 'labels': int32 [N], 'ratings':
  float32 [N], 'sources': str [N]}}: NYT + tweets pooled and deduplicated, each class split
  in the given fractions by a seeded permutation, each part then shuffled."""
  if not (0 < test_fraction and 0 <= val_fraction and test_fraction + val_fraction < 1):
    raise UserError(f"test_fraction={test_fraction} and val_fraction={val_fraction} must be "
                    "a positive and a non-negative share that sum to less than 1")
  texts, ratings, sources = load_opinions(path)
  labels = rating_labels(ratings)
  rng = np.random.default_rng(SPLIT_SEED)
  parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
  for c in range(len(LABELS)):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    n_val = int(round(val_fraction * len(idx)))
    parts["test"].append(idx[:n_test])
    parts["val"].append(idx[n_test:n_test + n_val])
    parts["train"].append(idx[n_test + n_val:])
  split = {}
  for name, chunks in parts.items():
    idx = rng.permutation(np.concatenate(chunks))  # not sorted by class
    split[name] = {"texts": [texts[i] for i in idx], "labels": labels[idx],
                   "ratings": ratings[idx], "sources": sources[idx]}
  return split


def macro_f1(y_true, y_pred, num_classes: int) -> float:
  """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), over the classes
  that occur in y_true or y_pred (as scikit-learn's f1_score(average='macro'))."""
  y_true = np.asarray(y_true).astype(np.int64).ravel()
  y_pred = np.asarray(y_pred).astype(np.int64).ravel()
  if y_true.shape != y_pred.shape or not len(y_true):
    raise UserError(f"macro_f1 needs as many predictions as labels (at least one), got "
                    f"{len(y_pred)} predictions for {len(y_true)} labels")
  for name, y in (("labels", y_true), ("predictions", y_pred)):
    if y.min() < 0 or y.max() >= num_classes:
      raise UserError(f"{name} must be classes 0..{num_classes - 1}, got {y.min()}..{y.max()}")
  confusion = np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2
                          ).reshape(num_classes, num_classes)
  tp = np.diag(confusion)
  support = confusion.sum(axis=1)  # TP + FN
  predicted = confusion.sum(axis=0)  # TP + FP
  present = (support + predicted) > 0
  f1 = 2 * tp[present] / (support[present] + predicted[present])
  return float(f1.mean())


def tfidf_lr_baseline(train: dict, test: dict) -> dict:
  """{'accuracy', 'macro_f1', 'majority_rate'} on `test` of TF-IDF (word 1-2 grams) +
  logistic regression (scikit-learn) fitted on `train` (parts of `opinion_split`): the
  classical baseline a fine-tuned classifier must beat. majority_rate is the accuracy of
  always answering train's most common class."""
  try:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
  except ImportError as e:
    raise UserError("the TF-IDF baseline needs scikit-learn: pip install scikit-learn") from e
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
  x_train = vectorizer.fit_transform(train["texts"])
  # newton-cg: the same fit as the default lbfgs (accuracy within 0.1%) in 0.6 s, not 7-15 s,
  # on 80k sparse features and three classes.
  clf = LogisticRegression(C=4.0, solver="newton-cg", max_iter=2000).fit(x_train,
                                                                        train["labels"])
  predicted = clf.predict(vectorizer.transform(test["texts"]))
  majority = np.bincount(train["labels"], minlength=len(LABELS)).argmax()
  return {"accuracy": float((predicted == test["labels"]).mean()),
          "macro_f1": macro_f1(test["labels"], predicted, len(LABELS)),
          "majority_rate": float((test["labels"] == majority).mean())}
