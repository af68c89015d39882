"""The reason written beside each default of a config dataclass, read from the class's own source, so the CLI's
help, the API docs, the settings and the Admin form all show the one text the code carries."""

from __future__ import annotations

import inspect
import io
import textwrap
import tokenize
from dataclasses import fields


def field_reasons(cls: type) -> dict[str, str]:
    """Each dataclass field's reason: the comment lines just above it (section headings `# --- ...` excepted), the
    comment on its line, and the `#   ...` lines (two or more spaces after the #) that continue that comment."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: callers fall back to names and defaults
        return {}
    names = {f.name for f in fields(cls)}
    reasons: dict[str, str] = {}
    above: list[str] = []
    line: list[tokenize.TokenInfo] = []
    last: str | None = None  # the field whose comment a `#   ...` line continues
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and not line:  # a comment on a line of its own
            text = token.string[1:]
            if last and text.startswith("  "):
                reasons[last] = f"{reasons.get(last, '')} {text.strip()}".strip()
            elif not text.strip().startswith("---"):
                above.append(text.strip())
                last = None
            else:
                last = None
        elif token.type == tokenize.NEWLINE:  # the end of a statement
            last = None
            if len(line) > 1 and line[0].string in names and line[1].string == ":":
                inline = [t.string.lstrip("#").strip() for t in line if t.type == tokenize.COMMENT]
                if reason := " ".join(above + inline):
                    reasons[line[0].string] = reason
                last = line[0].string
            above, line = [], []
        elif token.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            line.append(token)
    return reasons
