"""One exception type for problems a user can fix (bad config, data, paths, inputs).

The CLI prints these as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(ValueError):
  """A problem in the user's config, data, paths or inputs; the message says the fix."""


def did_you_mean(name: str, choices) -> str:
  """' (did you mean 'x'?)' for the closest choice, or ''."""
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return f" (did you mean '{close[0]}'?)" if close else ""
