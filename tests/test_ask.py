"""The retrieval-grounded assistant end to end on CPU: `aigc-jax index` on the first
passages of the standard-library collection, then `aigc-jax ask` printing an answer by
SmolLM2-135M-Instruct and its sources; an index and an encoder that do not belong
together, and other bad input, are one clear error each."""

import json

import pytest

from aigc_jax.errors import UserError
from tests.conftest import run_cli

try:
  from aigc_jax.pretrained.bert import minilm_path
  from aigc_jax.pretrained.gguf import smollm2_path
  minilm_path(), smollm2_path()
except UserError as e:  # pragma: no cover - make setup installs both wheels
  pytest.skip(f"a model wheel is missing ({e})", allow_module_level=True)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  folder = tmp_path_factory.mktemp("ask")
  config = folder / "index_config.py"
  config.write_text(
      "from aigc_jax.apps.ask import default_index_config\n"
      "def get_config():\n"
      "  c = default_index_config()\n"
      "  c.collection.limit = 40\n"
      f"  c.index.dir = {str(folder / 'index')!r}\n"
      "  return c\n")
  proc = run_cli("index", "--config", str(config))
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["passages"] == 40 and summary["dim"] == 384
  return folder / "index"


def test_ask_prints_an_answer_and_its_sources(index):
  proc = run_cli("ask", "--index", str(index), "--k", "3", "--max-new-tokens", "40",
                 "How do I register a virtual subclass of an abstract base class?")
  assert proc.returncode == 0, proc.stderr[-2000:]
  answer, sources = proc.stdout.split("\nSources:\n")
  assert len(answer.split()) >= 3  # some words of an answer
  lines = sources.strip().splitlines()
  assert len(lines) == 3 and lines[0].lstrip().startswith("[1] ")
  assert "abc.ABCMeta.register" in sources  # the passage that answers it, retrieved


def test_an_index_of_another_encoder_and_bad_questions_are_refused(index, tmp_path):
  import shutil
  other = tmp_path / "other"
  shutil.copytree(index, other)
  meta = json.loads((other / "meta.json").read_text())
  meta["encoder"] = "some-other-encoder"
  (other / "meta.json").write_text(json.dumps(meta))
  for args, message in (([ "--index", str(other), "what is abc?"], "rebuild the index"),
                        (["--index", str(index), "   "], "the question is empty"),
                        (["--index", str(tmp_path / "none"), "q?"], "is not a folder"),
                        (["--index", str(index), "one", "two"], "one question")):
    proc = run_cli("ask", *args)
    assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
