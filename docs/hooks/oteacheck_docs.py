"""mkdocs hooks: the configuration reference is generated from the code at build time, and pages written by
others (HDFS set-up, benchmarks) join the navigation when they exist."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
MARKER = "<!-- configuration-reference -->"
OPTIONAL_PAGES = [("HDFS set-up", "hdfs.md"), ("Benchmarks", "benchmarks.md")]


def on_config(config, **kwargs):
    nav = config["nav"]
    guides = next((item for item in nav if isinstance(item, dict) and "Guides" in item), None)
    target = guides["Guides"] if guides is not None else nav
    for title, page in OPTIONAL_PAGES:
        if (DOCS / page).exists() and not any(page in str(item) for item in target):
            target.append({title: page})
    # any other page someone added (benchmark results, ...) joins the guides under its first heading
    listed = str(nav)
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        if name.startswith("hooks/") or f"'{name}'" in listed or name in str(target):
            continue
        target.append({_title(page): name})
    return config


def _title(page: Path) -> str:
    for line in page.read_text(errors="replace").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem.replace("-", " ").replace("_", " ").capitalize()


def on_page_markdown(markdown, page, **kwargs):
    if MARKER not in markdown:
        return markdown
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference import markdown as reference

    return markdown.replace(MARKER, reference())
