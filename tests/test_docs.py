"""README.md and docs/*.md say only true things about links, commands and flags (issue #21).

* Every relative link (``[text](path)``, ``![alt](path)``, ``path#anchor``, ``#anchor``) resolves to a file or folder
  of the repository; an anchor into a markdown file names one of its headings (GitHub's slugs).
* Every ``retroformer ...`` command (and ``python -m retroformer_cli ...``), in a fenced block (``$ `` prompts and
  ``\\`` continuation lines included) or an inline code span, names only subcommands and options that exist: the
  tokens are parsed against the click command tree of ``retroformer_cli.cli.app``, global options first, after the
  CLI's own hoisting of ``--json``/``--config``/``--workspace`` from behind the subcommand.
* Every ``python benchmarks/X.py``, ``python recipes/X.py`` and ``python -m retroformer_cli.MODULE`` command names a
  script or module that exists, and each of its ``--options`` appears in that script's ``--help``.

The last tests feed the checks bad examples, so each check is shown to fail when a doc is wrong.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------------------------
# Markdown: fenced blocks, inline code, headings, links

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(?!`)((?:[^`\n]|\n(?![ \t]*\n))+?)`(?!`)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
LINK = re.compile(r"!?\[(?:[^\]\n]|\n(?![ \t]*\n))*?\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def fenced_blocks(text: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(text)]


def without_fences(text: str) -> str:
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def inline_spans(text: str) -> list[str]:
    return [" ".join(m.group(1).split()) for m in INLINE.finditer(without_fences(text))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(without_fences(path.read_text(encoding="utf-8"))):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Relative links of one markdown file that point at nothing (code blocks and spans are not links)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    prose = INLINE.sub(lambda m: " " * len(m.group(0)), without_fences(text))
    out = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            out.append(f"{path.name}: link to {target!r}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            out.append(f"{path.name}: link to {target!r}: no heading #{anchor} in {dest.name}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Commands: shell lines -> argument lists

CONTROL = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECT = {">", ">>", "<", "2>", "&>"}


def shell_lines(block: str) -> list[str]:
    """Logical lines of a shell block: ``\\`` continuations joined, ``$ `` prompts dropped."""
    out, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        out.append(re.sub(r"^\s*\$\s+", "", current))
        current = ""
    if current:
        out.append(current)
    return out


def segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``&&``, ``|``, ``;`` ..., redirections and comments
    dropped); a line shlex cannot read (a Python line, an unclosed quote) gives none."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    out, current, skip = [], [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in CONTROL:
            out.append(current)
            current = []
        elif tok in REDIRECT:
            skip = True
        else:
            current.append(tok)
    out.append(current)
    return [s for s in out if s]


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """``(source line, argv)`` for every simple command in the fenced blocks and inline code of a doc."""
    lines = [ln for block in fenced_blocks(text) for ln in shell_lines(block)]
    lines += [span for span in inline_spans(text) if re.match(r"(retroformer|python3?|accelerate) ", span)]
    out = []
    for line in lines:
        for argv in segments(line):
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value before a command
                argv = argv[1:]
            if argv:
                out.append((line, argv))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The retroformer CLI's command tree

@functools.lru_cache(maxsize=None)
def cli_root():
    import typer

    from retroformer_cli import cli

    return typer.main.get_command(cli.app)


def _find_option(cmd, name: str):
    if name in ("-h", "--help"):
        return "help"
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "option" and name in (*p.opts, *p.secondary_opts):
            return p
    return None


def cli_problems(args: list[str]) -> list[str]:
    """What in ``retroformer ARGS`` names a subcommand or an option that does not exist."""
    from retroformer_cli import cli

    args = cli._hoist_globals(list(args))  # the CLI moves --json/--config/--workspace in front before parsing
    cmd, path, out = cli_root(), ["retroformer"], []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            break
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\d", tok):
            name, eq, _ = tok.partition("=")
            opt = _find_option(cmd, name)
            if opt is None:
                out.append(f"`{' '.join(path)}` has no option {name}")
            elif opt == "help":
                break
            elif not (opt.is_flag or opt.count or eq):
                i += max(opt.nargs, 1)
            continue
        if hasattr(cmd, "commands"):  # a group: a word here names its subcommand
            if tok not in list(cmd.commands):
                out.append(f"`{' '.join(path)}` has no command {tok!r}")
                break
            cmd = cmd.commands[tok]
            path.append(tok)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scripts and modules: their --help

@functools.lru_cache(maxsize=None)
def help_options(*target: str) -> frozenset[str] | None:
    """The options a script's (or ``-m`` module's) ``--help`` names; None when it does not run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    if proc.returncode != 0:
        return None
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


def script_problems(target: tuple[str, ...], args: list[str]) -> list[str]:
    if target[0] != "-m" and not (REPO / target[0]).is_file():
        return [f"{target[0]} does not exist"]
    known = help_options(*target)
    if known is None:
        return [f"`python {' '.join(target)} --help` fails"]
    return [f"`python {' '.join(target)}` has no option {tok.partition('=')[0]}"
            for tok in args if tok.startswith("--") and len(tok) > 2 and tok.partition("=")[0] not in known]


def command_problems(argv: list[str]) -> list[str]:
    """Problems of one simple command, or [] for a command these checks do not cover (curl, jq, pip ...)."""
    if argv[0] == "retroformer":
        return cli_problems(argv[1:])
    if "-m" in argv[:-1] and argv[0] in ("python", "python3", "accelerate"):
        at = argv.index("-m")
        module, rest = argv[at + 1], argv[at + 2:]
        if module == "retroformer_cli":
            return cli_problems(rest)
        if module.startswith("retroformer_cli."):
            return script_problems(("-m", module), rest)
        return []
    if argv[0] in ("python", "python3") and len(argv) > 1 and re.match(r"^(benchmarks|recipes)/[\w-]+\.py$", argv[1]):
        return script_problems((argv[1],), argv[2:])
    return []


def doc_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8") if text is None else text
    out = link_problems(path, text)
    for line, argv in commands_in(text):
        out += [f"{path.name}: {p}, in: {line}" for p in command_problems(argv)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The docs as they are

@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_resolve(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_commands_name_only_existing_subcommands_and_flags(path):
    problems = [p for p in doc_problems(path) if ": link to " not in p]
    assert not problems, "\n".join(problems)


def test_the_docs_have_commands_to_check():
    """The checks above see the commands: a parse that silently found nothing would pass any doc."""
    found = [argv for path in doc_files() for _, argv in commands_in(path.read_text(encoding="utf-8"))]
    assert sum(a[0] == "retroformer" for a in found) >= 40
    assert sum(len(a) > 1 and a[1].startswith("benchmarks/") for a in found) >= 15
    assert any(len(a) > 1 and a[1].startswith("recipes/") for a in found)


def test_readme_keeps_the_quick_start_commands_and_a_contents_line():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = fenced_blocks(readme)
    assert ("bash scripts/install.sh && retroformer collect --env hotpotqa --tasks 2 --trials 2 --run demo "
            "&& retroformer eval --run demo\n") in blocks
    assert "bash scripts/test.sh\n" in blocks
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "**Contents**" in readme.split("## ")[0], "the table of contents sits above the first section"


# ---------------------------------------------------------------------------------------------------------------
# The checks fail on bad docs

def test_slugs_follow_github():
    assert slug("Does training help? (measured)") == "does-training-help-measured"
    assert slug("Serving local models: `retroformer serve`") == "serving-local-models-retroformer-serve"
    assert slug("The retrospective model: `datasets` → `sft` → `reward` → `ppo`") == \
        "the-retrospective-model-datasets--sft--reward--ppo"
    assert slug("A [linked](x.md) env_name") == "a-linked-env_name"


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A section\n\n## A section\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n[ok](docs/page.md) [ok](docs/page.md#a-section) [ok](docs/page.md#a-section-1) [ok](#top)\n"
        "[ok](docs/) [web](https://example.com/x.md) `[code](missing.md)`\n\n```\n[block](missing.md)\n```\n"
        "[gone](docs/missing.md) ![img](docs/missing.png) [bad anchor](docs/page.md#no-such)\n[self](#nowhere)\n")
    problems = link_problems(readme)
    assert len(problems) == 4, problems
    assert any("docs/missing.md" in p for p in problems) and any("docs/missing.png" in p for p in problems)
    assert any("#no-such" in p for p in problems) and any("#nowhere" in p for p in problems)


def test_commands_are_parsed_like_a_shell():
    text = ("```bash\n$ retroformer collect --env hotpotqa \\\n    --tasks 2  # a comment --nope\n"
            "FOO=1 retroformer eval --run a --json | jq . > out.json && python benchmarks/cpu_linear.py --rows 1\n"
            "```\nSee `retroformer serve --adapter\nname=path` and `python -m retroformer_cli --help`.\n")
    argvs = [argv for _, argv in commands_in(text)]
    assert ["retroformer", "collect", "--env", "hotpotqa", "--tasks", "2"] in argvs
    assert ["retroformer", "eval", "--run", "a", "--json"] in argvs
    assert ["jq", "."] in argvs and ["python", "benchmarks/cpu_linear.py", "--rows", "1"] in argvs
    assert ["retroformer", "serve", "--adapter", "name=path"] in argvs
    assert ["python", "-m", "retroformer_cli", "--help"] in argvs


def test_good_commands_pass():
    good = [
        "retroformer -w WS --json reward --dataset x --max-steps 2",
        "retroformer eval --run x --json",             # a global option after the subcommand
        "retroformer ppo --config configs/ppo.yaml",
        "retroformer -c configs/alfworld.yaml eval --env alfworld --compare a b",
        "retroformer reward score --checkpoint c --prompt p",
        "retroformer collect --no-prefix-reuse --prefix-cache-mb=256",
        "retroformer env serve --env webshop --help",
        "retroformer --version",
    ]
    for line in good:
        assert command_problems(shlex.split(line)) == [], line


def test_missing_subcommands_and_flags_are_reported():
    assert command_problems(shlex.split("retroformer collect --no-such-flag 3")) == [
        "`retroformer collect` has no option --no-such-flag"]
    assert command_problems(shlex.split("retroformer nosuch --env x")) == ["`retroformer` has no command 'nosuch'"]
    assert command_problems(shlex.split("retroformer env nosuch")) == ["`retroformer env` has no command 'nosuch'"]
    assert command_problems(shlex.split("retroformer reward score --max-steps 2")) == [
        "`retroformer reward score` has no option --max-steps"]
    assert command_problems(shlex.split("python -m retroformer_cli eval --nope=1")) == [
        "`retroformer eval` has no option --nope"]
    assert command_problems(shlex.split("retroformer --tasks 2 collect"))[0] == "`retroformer` has no option --tasks"


def test_script_flags_are_checked_against_their_help():
    assert command_problems(shlex.split("python benchmarks/cpu_linear.py --threads 1 --rows 1 2")) == []
    assert command_problems(shlex.split("python benchmarks/cpu_linear.py --no-such 1")) == [
        "`python benchmarks/cpu_linear.py` has no option --no-such"]
    assert command_problems(shlex.split("python benchmarks/no_such_benchmark.py")) == [
        "benchmarks/no_such_benchmark.py does not exist"]
    assert command_problems(shlex.split("python -m retroformer_cli.testing.fake_openai_server --nope")) == [
        "`python -m retroformer_cli.testing.fake_openai_server` has no option --nope"]


def test_a_bad_doc_fails_the_doc_check(tmp_path):
    doc = tmp_path / "bad.md"
    doc.write_text("# Bad\n\n```bash\nretroformer collect --env hotpotqa --tasks 2 --no-such-flag\n```\n\n"
                   "Run `python recipes/learning.py --nope`; see [there](missing.md).\n")
    problems = doc_problems(doc)
    assert len(problems) == 3, problems
