"""Generated sections of a Markdown document, so that several scripts can fill one page (docs/accuracy.md).

A section is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; everything outside the markers is
left as written by hand. A missing section is appended at the end.
"""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, body: str, title: str = "") -> None:
    """Replace (or append) the generated section `name` of the Markdown file `path` with `body`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else (f"# {title}\n\n" if title else "")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
