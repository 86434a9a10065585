"""The documentation stays true (docs/contributing.md, "The documentation").

- the Sphinx site in ``docs/`` builds with warnings as errors (docstrings included, through autodoc);
- every relative link in ``README.md``, ``weights/README.md`` and ``docs/**/*.md`` names a file that exists and,
  where it has an anchor, a heading of that file (GitHub's and MyST's slug of the heading);
- every ``segcli ...`` command quoted in them (code blocks and inline code) parses with the current command
  line: the subcommand exists, every option exists and gets its number of values, and no extra positional
  argument is left over. Nothing is run: the options are matched by the commands' own click parser, without
  converting values (so a path that does not exist here is fine);
- every ``segcli.x.y`` they name can be imported (the documented import paths keep working);
- every module of ``segcli/`` has its place in the API reference, and every benchmark script and results file
  appears in docs/performance.md.

The Markdown is read with markdown-it-py (a dependency of rich, so always installed), which also tells code
from prose.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from markdown_it import MarkdownIt

from segcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def markdown_files() -> list[Path]:
    """README.md, weights/README.md and the site's pages (not the build output, not the incoming notes)."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if not {"_build", "incoming"} & set(p.relative_to(DOCS).parts)]
    return [ROOT / "README.md", ROOT / "weights" / "README.md", *pages]


def parse(path: Path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ anchors

_SLUG_DROP = re.compile(r"[^\w\- ]")


def slug(title: str) -> str:
    """GitHub's heading anchor, which MyST's ``myst_heading_anchors`` also uses: lower case, every character
    that is not a word character, '-' or a space dropped, spaces turned into '-'."""
    return _SLUG_DROP.sub("", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of a Markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    tokens = parse(path)
    seen: dict[str, int] = {}
    found = set()
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        inline = tokens[i + 1]
        text = "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    # MyST's explicit targets: a line "(name)=" before a heading or block.
    found.update(re.findall(r"^\(([\w\-]+)\)=\s*$", path.read_text(encoding="utf-8"), flags=re.M))
    return found


def links(path: Path) -> list[str]:
    """Every link and image target of a Markdown file (code blocks and inline code are not links)."""
    out = []
    for tok in parse(path):
        for child in tok.children or []:
            if child.type == "link_open":
                out.append(child.attrGet("href"))
            elif child.type == "image":
                out.append(child.attrGet("src"))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``path`` whose file, or heading, does not exist (named relative to ``root``)."""
    wrong = []
    for href in links(path):
        if not href or re.match(r"^[a-z][a-z0-9+.-]*:", href, flags=re.I):  # http:, https:, mailto: ...
            continue
        target, _, anchor = href.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            wrong.append(f"{path.relative_to(root)}: {href}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            wrong.append(f"{path.relative_to(root)}: {href}: no such heading in {file.name}")
    return wrong


def test_slug_matches_github():
    assert slug("Foreground prior: --prior") == "foreground-prior---prior"
    assert slug("Running on a cluster (Ray)") == "running-on-a-cluster-ray"
    assert slug("Seed systems' checkpoints") == "seed-systems-checkpoints"
    assert slug("Features with a known answer (bench_oracle)") == "features-with-a-known-answer-bench_oracle"


def test_link_check_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page.write_text("# Page\n\n[ok](other.md#a-section) [ok](#page) [web](https://example.org/x)\n"
                    "[gone](missing.md) [bad anchor](other.md#no-section) [bad local](#nowhere)\n"
                    "`[not a link](missing.md)`\n")
    wrong = broken_links(page, root=tmp_path)
    assert wrong == ["page.md: missing.md: no such file", "page.md: other.md#no-section: no such heading in other.md",
                     "page.md: #nowhere: no such heading in page.md"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


# ------------------------------------------------------------------------------------------------ commands

# Where a quoted command starts: "segcli " at the start, or after a space, a shell separator or a quote.
_COMMAND = re.compile(r"(?:^|(?<=[\s;&|(\"']))segcli\s")


def quoted_commands(path: Path) -> list[str]:
    """Every ``segcli ...`` command in a file's code blocks (lines joined at a trailing backslash) and inline
    code, cut at the end of its shell command (a pipe, a redirection, ``;``, ``&``, a closing quote) and with
    a shell comment removed."""
    snippets: list[str] = []
    for tok in parse(path):
        if tok.type in ("fence", "code_block") and tok.info.strip().split(" ")[0] not in ("python", "yaml-schema", "text"):
            snippets.extend(tok.content.replace("\\\n", " ").splitlines())
        for child in tok.children or []:
            # An inline span that starts as segcli's own output ("segcli: error: ...") quotes a message, not a
            # command, even where the message names segcli again.
            if child.type == "code_inline" and not child.content.startswith("segcli:"):
                snippets.append(child.content)
    commands = []
    for line in snippets:
        for m in _COMMAND.finditer(line):
            text = line[m.start():]
            quote = line[m.start() - 1] if m.start() and line[m.start() - 1] in "\"'" else None
            if quote:
                text = text.split(quote, 1)[0]
            commands.append(text)
    return commands


def shell_words(command: str) -> list[str]:
    """The words of one shell command: comments dropped, cut at the first operator (``|``, ``>``, ``;`` ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word and set(word) <= set("();<>|&"):
            break
        words.append(word)
    return words


def check_command(words: list[str]) -> str | None:
    """None if ``words`` (starting with "segcli") parses with the current CLI, else why not.

    The commands' own click parsers match options and count their values; values are not converted, and
    missing arguments are allowed (prose quotes fragments such as ``segcli segment --help``), but an unknown
    command or option, an option without its value, and a positional argument too many are errors."""
    assert words[0] == "segcli"
    group = typer.main.get_command(app)
    gctx = group.context_class(group, info_name="segcli")
    try:
        _, rest, _ = group.make_parser(gctx).parse_args(list(words[1:]))
        if not rest:
            return None
        name, args = rest[0], rest[1:]
        command = group.get_command(gctx, name)
        if command is None:
            return f"no such command {name!r}"
        ctx = command.context_class(command, info_name=name, parent=gctx)
        _, extra, _ = command.make_parser(ctx).parse_args(list(args))
    except Exception as exc:  # click's usage errors (typer vendors its own click: no public base class here)
        return f"{type(exc).__name__}: {exc}"
    if extra:
        return f"unexpected extra arguments {extra}"
    return None


def test_command_check_rejects_what_the_cli_rejects():
    assert check_command(shell_words("segcli segment images/ --out masks/ --k 4 --overlay o/ # comment")) is None
    assert check_command(shell_words("segcli --debug evaluate a/ b/ --preset voc | tee log > x")) is None
    assert check_command(shell_words("segcli segment --help")) is None
    assert "No such option" in check_command(shell_words("segcli segment images/ --no-such-option"))
    assert "no such command" in check_command(shell_words("segcli segmnet images/"))
    assert "requires an argument" in check_command(shell_words("segcli segment images/ --k"))
    assert "extra arguments" in check_command(shell_words("segcli evaluate a/ b/ c/"))
    assert "No such option" in check_command(shell_words("segcli --verbose segment images/"))


def test_quoted_commands_are_found(tmp_path):
    page = ROOT / "README.md"
    found = quoted_commands(page)
    assert any(c.startswith("segcli cluster-dataset voc/ --k 21") for c in found)
    text = ('```\nfor i in 1 2; do segcli segment a/ --shard $i/2 & done; wait\n'
            'ray exec c.yaml "segcli segment a/ --engine ray"\n'
            'segcli segment a/ \\\n  --k 3\n```\nand `segcli evaluate a/ b/`\n')
    probe = tmp_path / "probe.md"
    probe.write_text(text)
    got = [shell_words(c) for c in quoted_commands(probe)]
    assert got == [["segcli", "segment", "a/", "--shard", "$i/2"], ["segcli", "segment", "a/", "--engine", "ray"],
                   ["segcli", "segment", "a/", "--k", "3"], ["segcli", "evaluate", "a/", "b/"]]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_commands_parse(path):
    wrong = []
    for command in quoted_commands(path):
        reason = check_command(shell_words(command))
        if reason:
            wrong.append(f"{command}\n    -> {reason}")
    assert not wrong, f"{path.relative_to(ROOT)}:\n" + "\n".join(wrong)


def test_readme_test_command_is_the_ci_command():
    """The set-up command for the tests in README.md, docs/install.md and docs/contributing.md is exactly what CI
    runs (.ci/run)."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(ci) == 1
    for page in (ROOT / "README.md", DOCS / "install.md", DOCS / "contributing.md"):
        assert ci[0].strip() in page.read_text(), page.name


# ------------------------------------------------------------------------------------------------ coverage

def test_every_module_is_in_the_api_reference():
    documented = set()
    for page in (DOCS / "reference").glob("*.md"):
        documented.update(re.findall(r"automodule:: (\S+)", page.read_text()))
    modules = set()
    for path in (ROOT / "segcli").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":  # runs the CLI when imported: nothing to document
            modules.add(".".join(parts))
    assert not modules - documented, f"not in docs/reference/: {sorted(modules - documented)}"
    assert not documented - modules, f"no such module: {sorted(documented - modules)}"


def test_every_benchmark_is_documented():
    text = (DOCS / "performance.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*") if p.suffix in (".json", ".txt"))
    assert scripts
    missing = [name for name in scripts + results if name not in text]
    assert not missing, f"not in docs/performance.md: {missing}"


_DOTTED = re.compile(r"\bsegcli(?:\.[A-Za-z_]\w*)+")


def resolves(name: str) -> bool:
    """Whether a dotted name is an importable module or an attribute reached from one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_dotted_name_check():
    assert resolves("segcli.method.model.SegModel") and resolves("segcli.io.images")
    assert not resolves("segcli.model_file") and not resolves("segcli.method.model.NoSuchThing")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_and_objects_exist(path):
    """Every ``segcli.x.y`` the docs name can be imported, so the documented import paths keep working. The
    "before" column of docs/python-api.md's table of changed import paths names the old paths on purpose."""
    text = path.read_text(encoding="utf-8")
    if path.name == "python-api.md":
        start = text.index("## Import paths that changed")
        end = text.index("\n## ", start + 5)
        now = [row.split("|")[2] for row in text[start:end].splitlines() if row.startswith("| `")]
        text = text[:start] + "\n".join(now) + text[end:]
    missing = sorted({name for name in _DOTTED.findall(text) if not resolves(name)})
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {missing}"


# ------------------------------------------------------------------------------------------------ the build

@pytest.mark.slow
def test_site_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    run = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
                          "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "reference" / "method.html").is_file()
