"""The README's command blocks work as written in a new shell, with no virtualenv activated, and every
relative link and anchor of the README and docs/ leads somewhere."""

import os
import re
import shlex
import shutil
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


def _all_blocks() -> list[list[str]]:
    blocks = command_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 8 and any(ACTIVATE in line for block in blocks for line in block)
    for doc in sorted((ROOT / "docs").glob("*.md")):  # the long forms the README links to
        blocks += command_blocks(doc.read_text())
    return blocks


def test_every_readme_command_is_written_to_run_in_the_virtualenv_without_it_being_activated():
    missing = [cmd for block in _all_blocks() for cmd in commands_missing_the_venv(block)]
    assert not missing, f"README commands that need `{ACTIVATE}` or .venv/bin/ first: {missing}"


# programs a README block may name that a fresh clone does not have until a step before it installs them
INSTALLED_BY_THE_STEPS = {"kaggle", "psql", "docker", "nvidia-smi", "torchrun", "xdg-open"}
BUILTINS = {"source", "cd", "export", "wait"}


def test_every_program_a_readme_command_runs_exists_here_or_in_the_virtualenv():
    """The first word of each command is a program of this machine, of .venv/bin or of the repository."""
    venv = ROOT / ".venv" / "bin"
    path = os.pathsep.join([str(venv), os.environ.get("PATH", "")])
    unknown = set()
    for block in _all_blocks():
        for line in block:
            for words in _commands(line):
                while words and re.match(r"^\w+=", words[0]):
                    words = words[1:]
                program = words[0].removeprefix(".venv/bin/") if words else ""
                if not words or words[0] in BUILTINS or program in INSTALLED_BY_THE_STEPS:
                    continue
                if not (shutil.which(program, path=path) or (ROOT / words[0]).exists() or program.startswith("<")):
                    unknown.add(words[0])
    assert not unknown, f"README commands naming programs that are nowhere: {sorted(unknown)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file whose file or #anchor does not exist."""
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [b for doc in docs for b in broken_links(doc)]
    assert not broken, broken


def test_the_link_check_catches_a_missing_anchor_and_file(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Two words: here\n[ok](#two-words-here) [no](#nowhere) [gone](b.md)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: #nowhere (no such heading)", "a.md: b.md (no such file)"]


def test_the_checker_catches_a_bare_dvc_command():
    assert commands_missing_the_venv(["dvc exp run -S train.lr=0.01"]) == ["dvc exp run -S train.lr=0.01"]
    assert commands_missing_the_venv([".venv/bin/dvc repro --force"]) == [".venv/bin/dvc repro --force"]
    assert commands_missing_the_venv(["make run", ".venv/bin/dvc metrics show"]) == []
    assert commands_missing_the_venv(["make x | dvc exp show --drop 'a|b'"]) == ["dvc exp show --drop a|b"]
    assert commands_missing_the_venv([f"{ACTIVATE} && dvc repro", "CUDA_VISIBLE_DEVICES=0 python -m x &"]) == []
