"""Markdown rendering of prompts, answers and guidelines: formatting survives (the attacks: tests/security/)."""

from html.parser import HTMLParser

from app.ui.render import escape_markdown, quote_block, render_markdown, titled


def parse(html: str) -> tuple[list[tuple[str, dict]], str]:
    elements, text = [], []
    parser = HTMLParser(convert_charrefs=True)
    parser.handle_starttag = lambda tag, attrs: elements.append((tag, dict(attrs)))
    parser.handle_data = text.append
    parser.feed(html)
    return elements, "".join(text)


def test_markdown_formatting_and_code_survive():
    text = ("# Title\n\n1. **bold** and *it*\n2. ~~gone~~\n\n> quoted\n\n| a | b |\n| --: | - |\n| 1 | 2 |\n\n"
            "```html\n<b>kept literally</b>\n```\n\nand `a < b` inline, x < y outside\n\n---")
    elements, shown = parse(render_markdown(text))
    tags = [tag for tag, _ in elements]
    for tag in ("h1", "ol", "li", "strong", "em", "s", "blockquote", "table", "th", "td", "pre", "code", "hr"):
        assert tag in tags, tag
    assert "b" not in tags  # the <b> in the fence is code, shown literally
    assert "<b>kept literally</b>" in shown and "a < b" in shown and "x < y outside" in shown
    assert ("th", {"style": "text-align:right"}) in elements
    assert ("code", {}) in elements  # no class="language-html" (nothing outside the allow-list survives)


def test_unclosed_fence_is_code_to_the_end():
    elements, shown = parse(render_markdown("before <i>\n```\n<script>x</script>"))
    assert [tag for tag, _ in elements] == ["p", "pre", "code"]
    assert shown.startswith("before <i>") and "<script>x</script>" in shown


def test_ordered_list_keeps_its_start():
    assert ("ol", {"start": "3"}) in parse(render_markdown("3. three\n4. four"))[0]


def test_empty_answer_is_visible():
    assert parse(quote_block("   "))[1] == "(empty answer)"


def test_titled_escapes_its_title():
    elements, shown = parse(titled("Answer *1*", "**yes**"))
    assert [tag for tag, _ in elements] == ["p", "strong", "p", "strong"]
    assert shown.split() == ["Answer", "*1*", "yes"]


def test_escape_markdown_shows_text_literally():
    snippet = "<script>x</script> **not bold** [a](/ui/logout) ![i](/x) `c` $$x$$\n# not a heading"
    elements, shown = parse(render_markdown(escape_markdown(snippet)))
    assert [tag for tag, _ in elements] == ["p"]
    assert shown.rstrip("\n") == snippet
