"""MkDocs hook: pages that are generated from the repository at build time.

- ``<!-- include: README.md -->`` (docs/index.md): the README's guide, with its
  ``docs/`` link prefixes removed, so the guide is written once and its links work
  both on the repository page and on the site (``mkdocs build --strict`` checks them).
- ``<!-- include: longattn list -->`` (docs/mechanisms.md): the capability table of
  ``longattn list`` (:func:`longattn.cli_list.mechanism_table`), read from the registry,
  so it cannot fall out of date.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README_MARKER = "<!-- include: README.md -->"
LIST_MARKER = "<!-- include: longattn list -->"
_DOCS_LINK = re.compile(r"\]\(docs/")


def readme_for_site(readme: str) -> str:
    """README text with links into ``docs/`` made relative to the docs folder."""
    return _DOCS_LINK.sub("](", readme)


def mechanism_table() -> str:
    """The ``longattn list`` table and its legend, as markdown."""
    from longattn.cli_list import CAPABILITY_COLUMNS
    from longattn.cli_list import mechanism_table as table

    legend = "\n".join(f"- **{title}**: {meaning}" for title, meaning in CAPABILITY_COLUMNS)
    return table() + "\n\n" + legend


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the include markers (MkDocs ``on_page_markdown`` event)."""
    if README_MARKER in markdown:
        root = Path(config["config_file_path"]).parent
        markdown = markdown.replace(README_MARKER, readme_for_site((root / "README.md").read_text()))
    if LIST_MARKER in markdown:
        markdown = markdown.replace(LIST_MARKER, mechanism_table())
    return markdown
