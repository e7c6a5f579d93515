"""The documentation holds together: the README stays a front page whose every relative link
(and every `#anchor` into a page) exists, it links every page of the site, and `mkdocs build
--strict` builds the manual under docs/ with no warning (a broken link, a missing anchor, a
page left out of the nav)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_slug():
    """The anchors the site and GitHub both give headings (mkdocs.yml's hook: one definition)."""
    spec = importlib.util.spec_from_file_location("mkdocs_hooks",
                                                  ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks.github_slug


def outside_fences(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, as GitHub numbers repeats (-1, -2, ...)."""
    slug, seen = github_slug(), {}
    for line in outside_fences(path.read_text()):
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            # code spans and emphasis keep their text only, as in the rendered heading
            base = slug(re.sub(r"[`*]", "", heading.group(1)))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {base if n == 0 else f"{base}-{n}" for base, count in seen.items()
            for n in range(count)}


def relative_links(path: Path) -> list[str]:
    return [target for line in outside_fences(path.read_text())
            for target in LINK.findall(line)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto:


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_every_relative_link_in_the_readme_exists():
    targets = relative_links(README)
    assert targets, "no relative links found: the pattern is wrong"
    broken = []
    for target in targets:
        file, _, anchor = target.partition("#")
        path = (README.parent / file).resolve() if file else README
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT)}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_page_of_the_site():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = {page for entry in nav for page in entry.values()} - {"index.md"}
    linked = {target.partition("#")[0] for target in relative_links(README)}
    assert pages - {link.removeprefix("docs/") for link in linked} == set()
    # and the nav lists every page under docs/
    assert {p.name for p in (ROOT / "docs").glob("*.md")} == pages | {"index.md"}


def test_mkdocs_builds_the_site_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("cli", "configuration", "searching", "inspecting", "distributed",
                 "benchmarks", "reproducing", "contributing", "RESULTS", "ARCHITECTURE"):
        assert (site / page / "index.html").is_file(), page
    # the anchors the pages link by are GitHub's (the hook), e.g. `--set` keeps its hyphens
    html = (site / "configuration" / "index.html").read_text()
    assert 'id="overrides---set-keyvalue"' in html


NAMED_TEST = re.compile(r"`(test_\w+\.py)::(test_\w+)(\[[^\]`]*\])?`")


def test_every_test_the_docs_name_exists():
    """A cell of "What survives what" (or any page) that names a test names one that exists,
    with a parameter id it really has where it gives one."""
    missing = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for file, name, param in NAMED_TEST.findall(page.read_text(encoding="utf-8")):
            source = ROOT / "tests" / file
            text = source.read_text(encoding="utf-8") if source.is_file() else ""
            if not re.search(rf"^\s*(async )?def {name}\(", text, flags=re.M):
                missing.append(f"{page.name}: {file}::{name}")
            elif param and not all(part in text for part in param.strip("[]").split("-")
                                   if not part.isdigit()):
                missing.append(f"{page.name}: {file}::{name}{param}")
    assert not missing, missing
