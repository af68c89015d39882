"""Showing model answers and prompts as Markdown with raw HTML neutralised.

An answer that contains `<script>` or `<img onerror=...>` must show as text and run nothing. Escaping `<`, `>` and
`&` outside code keeps Markdown formatting (lists, emphasis) working; inside fenced blocks and inline code Markdown
already shows characters literally, and escaping there would print `&lt;` to the reader. Gradio's own sanitizer
(`sanitize_html=True`, its default) stays on behind this as a second line.
"""

from __future__ import annotations

import html
import re

# A fenced block (``` or ~~~, to its closing fence or the end) or an inline code span.
_CODE = re.compile(r"(^|\n)(```|~~~)[^\n]*\n.*?(?:\n\2[^\n]*(?=\n|$)|$)|(`+)[^`\n]+?\3", re.DOTALL)


def neutralise_html(text: str) -> str:
    """Markdown source in which no raw HTML survives outside code."""
    out, last = [], 0
    for match in _CODE.finditer(text):
        out.append(_escape(text[last:match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def _escape(segment: str) -> str:
    return html.escape(segment, quote=False)


def quote_block(text: str) -> str:
    """A prompt or answer ready for gr.Markdown; an empty answer says so rather than rendering nothing."""
    return neutralise_html(text) if text.strip() else "*(empty answer)*"
