"""Prompts, answers, guidelines and Demo chat as safe HTML: our Markdown renderer, then an allow-list sanitizer.

Anyone who can put text in front of annotators (a prompt file, the model, an admin's guidelines) must not be able to
make the page act for them (issue 8, item 3): a `![x](/ui/logout)` image that logs the reader out, an external image
that tracks who read what, a fake "session expired" form that sends a password away.

1. markdown-it-py parses the text as CommonMark (plus tables and strikethrough) with raw HTML OFF: `<script>`,
   `<form>` and every other tag in the text come out as visible text, wherever they stand.
2. A core rule then rewrites the parsed tokens:
   - an image is never fetched: it shows as its alt text, `[image: alt]`, whatever its URL;
   - a link stays a link only to another site: an absolute http(s) URL whose host is a DNS name with a dot
     (not `localhost`, not an IP address, where our own server lives) or a `mailto:`. Relative and
     protocol-relative URLs (`/ui/logout`, `/api/users`, `//host/x`), `javascript:`, `data:` and the rest show
     as their plain link text. markdown-it already refuses `javascript:`/`vbscript:`/`file:`/`data:` URLs and leaves
     their source as text. The renderer does not know the public name the server is reached by: a link to that
     name stays a link, followed only when someone clicks it (in a new tab); nothing loads by itself.
3. nh3 (ammonia) keeps only the tags and attributes this renderer can produce, only http/https/mailto URLs, no
   relative URLs, and gives every link `rel="noopener noreferrer nofollow"` and `target="_blank"`: a second line
   should step 1 or 2 ever let something through.

The HTML goes to `gr.HTML` (which inserts it as is: ours is the only Markdown interpreter; `gr.Markdown` would parse
our output again with its own Markdown renderer) and, for the Demo chat, to `gr.Chatbot(render_markdown=False)`,
which shows it through Gradio's own sanitizer (`sanitize_html=True`, its default) as a third line.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import gradio as gr
import nh3
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

# Every tag the renderer below can emit; anything else is removed by nh3 (its text kept).
ALLOWED_TAGS = frozenset({
    "p", "br", "hr", "em", "strong", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a",
})
ALLOWED_ATTRIBUTES = {
    "a": {"href"},  # rel and target are set by nh3 below, never taken from the text
    "ol": {"start"},  # "3. item" starts a list at 3
    "th": {"style"},  # table column alignment, reduced to text-align by STYLE_PROPERTIES
    "td": {"style"},
}
STYLE_PROPERTIES = frozenset({"text-align"})
URL_SCHEMES = frozenset({"http", "https", "mailto"})
LINK_REL = "noopener noreferrer nofollow"  # no window.opener, no Referer to the other site, no search-engine credit
EMPTY = "(empty answer)"  # shown for a blank answer, so an empty slot still reads as an answer


def _external(url: str) -> bool:
    """True for a URL that may stay a link: mailto, or absolute http(s) to another site's DNS name."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # e.g. a malformed IPv6 literal or port
        return False
    if parts.scheme == "mailto":
        return bool(parts.path)
    return parts.scheme in ("http", "https") and "\\" not in url and _other_site(host)


# A DNS name with a dot whose last label starts with a letter. A browser reads a host whose last label is a number
# (127.1, 0x7f.1, 2130706433) as an IPv4 address (WHATWG URL, "ends in a number"); IPv6 literals have no letters-only
# form here either. So IP addresses, single-label intranet names and relative URLs all fail this.
_DNS_NAME = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z][a-z0-9-]*\.?")


def _other_site(host: str) -> bool:
    """Not where this server answers: an IP address, localhost (and *.localhost, which browsers send to loopback)
    or a single-label LAN name is what a link to our own /ui/logout or /api would use."""
    name = host.rstrip(".")
    return bool(_DNS_NAME.fullmatch(host)) and name != "localhost" and not name.endswith(".localhost")


def _rewrite_inline(children: list[Token], md: MarkdownIt) -> list[Token]:
    out: list[Token] = []
    dropping = False  # inside a link that shows as its plain text (CommonMark links never nest)
    for token in children:
        if token.type == "image":
            alt = md.renderer.renderInlineAsText(token.children, md.options, {})
            text = Token("text", "", 0)
            text.content = f"[image: {alt}]" if alt.strip() else "[image]"
            out.append(text)
        elif token.type == "link_open" and not _external(str(token.attrGet("href") or "")):
            dropping = True
        elif token.type == "link_close" and dropping:
            dropping = False
        else:
            out.append(token)
    return out


def _safe_links_and_no_images(state: StateCore) -> None:
    for token in state.tokens:
        if token.type == "inline" and token.children:
            token.children = _rewrite_inline(token.children, state.md)


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    md.core.ruler.push("prefloop_safe_links", _safe_links_and_no_images)
    return md


_MD = _markdown()  # built once: MarkdownIt instances are reusable and render() keeps no state between calls


def render_markdown(text: str) -> str:
    """Untrusted Markdown as HTML safe to insert into our pages (see the module docstring for what survives)."""
    return nh3.clean(
        _MD.render(text),
        tags=set(ALLOWED_TAGS),
        attributes={tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()},
        filter_style_properties=set(STYLE_PROPERTIES),
        url_schemes=set(URL_SCHEMES),
        url_relative="deny",
        link_rel=LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )


def rendered_text(**kwargs) -> gr.HTML:
    """The component that shows `render_markdown` output: gr.HTML inserts it as is, with no second Markdown pass,
    no LaTeX pass and no script of its own (its default js_on_load adds a click handler we do not use)."""
    return gr.HTML(js_on_load=None, **kwargs)


def rendered_chat(**kwargs) -> gr.Chatbot:
    """A Chatbot whose messages are `render_markdown` output: not parsed as Markdown again, no LaTeX, and passed
    through Gradio's own HTML sanitizer (on by default, kept on explicitly) before it reaches the page."""
    return gr.Chatbot(render_markdown=False, sanitize_html=True, latex_delimiters=[], allow_tags=False, **kwargs)


def quote_block(text: str) -> str:
    """A prompt or answer as safe HTML; an empty answer says so rather than rendering nothing."""
    return render_markdown(text) if text.strip() else f"<p><em>{EMPTY}</em></p>"


def titled(title: str, text: str) -> str:
    """`quote_block(text)` under a bold title of ours (e.g. "Answer 1"); the title is escaped like any text."""
    return render_markdown(f"**{escape_markdown(title)}**") + quote_block(text)


def escape_markdown(text: str) -> str:
    """Markdown source that shows `text` literally, in any CommonMark renderer (gr.Markdown's too): every ASCII
    punctuation character backslash-escaped (CommonMark 2.4), so no tag, link, image or emphasis can form.
    For a short untrusted snippet (an error message) inside Markdown of our own."""
    return "".join(f"\\{c}" if c.isascii() and not c.isalnum() and not c.isspace() else c for c in text)
