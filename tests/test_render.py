from app.ui.render import neutralise_html, quote_block


def test_script_and_img_onerror_become_text():
    out = neutralise_html('Hi <script>alert(1)</script> and <img src=x onerror="alert(2)">')
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "&lt;img src=x onerror=\"alert(2)\"&gt;" in out


def test_markdown_formatting_and_code_survive():
    text = "1. **bold** item\n\n```html\n<b>kept literally</b>\n```\nand `a < b` inline, x < y outside"
    out = neutralise_html(text)
    assert "1. **bold** item" in out
    assert "<b>kept literally</b>" in out  # inside a fence Markdown shows it as code
    assert "`a < b`" in out
    assert "x &lt; y outside" in out


def test_unclosed_fence_is_code_to_the_end():
    out = neutralise_html("before <i>\n```\n<script>x</script>")
    assert out.startswith("before &lt;i&gt;")
    assert "<script>x</script>" in out  # the rest is a code block, shown literally


def test_empty_answer_is_visible():
    assert quote_block("   ") == "*(empty answer)*"
