"""Every Python snippet of the README runs: the blocks are executed in order, in one fresh
interpreter (a block may use names an earlier one defined), in a scratch directory that
sees the repository's configs/."""

import os
import re

from tests.conftest import ROOT, run_python

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_snippets() -> list[str]:
  return PYTHON_BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_library_snippets():
  snippets = readme_snippets()
  assert len(snippets) >= 3, "the README's library section lost its examples"


def test_every_readme_snippet_runs(tmp_path):
  os.symlink(ROOT / "configs", tmp_path / "configs")
  program = "\n\n".join(f"# --- README snippet {i + 1}\n{code}"
                        for i, code in enumerate(readme_snippets()))
  script = tmp_path / "readme_snippets.py"
  script.write_text(program)
  runner = ("import os, runpy, sys; sys.path.insert(0, sys.argv[2]); os.chdir(sys.argv[1]); "
            "runpy.run_path('readme_snippets.py', run_name='__main__'); print('README OK')")
  proc = run_python(runner, args=[str(tmp_path), str(ROOT)], timeout=900)
  assert proc.returncode == 0 and "README OK" in proc.stdout, proc.stderr[-4000:]
