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
    for extra in sorted(DOCS.glob("benchmarks?*.md")):
        if not any(extra.name in str(item) for item in target):
            target.append({f"Benchmarks: {extra.stem.removeprefix('benchmarks').strip('-_ ')}": extra.name})
    return config


def on_page_markdown(markdown, page, **kwargs):
    if MARKER not in markdown:
        return markdown
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference import markdown as reference

    return markdown.replace(MARKER, reference())
