"""The README's command blocks work as written in a new shell, with no virtualenv activated."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# commands that exist only inside the project's virtualenv (DVC runs its stages with `python` from PATH)
NEEDS_VENV = {"dvc", "python", "mlflow", "pytest", "pip", "torchrun", "kaggle", "optuna"}
ACTIVATE = "source .venv/bin/activate"


def command_blocks(text: str) -> list[list[str]]:
    """The README's ```bash blocks, as lists of commands (continuations joined, comments dropped)."""
    blocks = []
    for body in re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at &&, ||, ;, & and | outside quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "&", "|", ";;"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def commands_missing_the_venv(block: list[str]) -> list[str]:
    """The commands of `block` that would run outside the virtualenv."""
    missing, active = [], False
    for line in block:
        for words in _commands(line):
            while words and re.match(r"^\w+=", words[0]):  # CUDA_VISIBLE_DEVICES=0 python ...
                words = words[1:]
            if not words:
                continue
            if " ".join(words[:2]) == ACTIVATE:
                active = True
            elif (
                not active
                and (
                    words[0] in NEEDS_VENV
                    or (  # .venv/bin/dvc itself runs, its stages' python not
                        words[0].endswith(".venv/bin/dvc") and (words[1:2] == ["repro"] or words[1:3] == ["exp", "run"])
                    )
                )
            ):
                missing.append(" ".join(words))
    return missing


def test_every_readme_command_runs_in_the_virtualenv_without_it_being_activated():
    blocks = command_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 8 and any(ACTIVATE in line for block in blocks for line in block)
    for doc in sorted((ROOT / "docs").glob("*.md")):  # the long forms the README links to
        blocks += command_blocks(doc.read_text())
    missing = [cmd for block in blocks for cmd in commands_missing_the_venv(block)]
    assert not missing, f"README commands that need `{ACTIVATE}` or .venv/bin/ first: {missing}"


def test_the_checker_catches_a_bare_dvc_command():
    assert commands_missing_the_venv(["dvc exp run -S train.lr=0.01"]) == ["dvc exp run -S train.lr=0.01"]
    assert commands_missing_the_venv([".venv/bin/dvc repro --force"]) == [".venv/bin/dvc repro --force"]
    assert commands_missing_the_venv(["make run", ".venv/bin/dvc metrics show"]) == []
    assert commands_missing_the_venv(["make x | dvc exp show --drop 'a|b'"]) == ["dvc exp show --drop a|b"]
    assert commands_missing_the_venv([f"{ACTIVATE} && dvc repro", "CUDA_VISIBLE_DEVICES=0 python -m x &"]) == []
