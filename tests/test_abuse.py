"""Bad input through every door (REST, the Annotate tab's Gradio endpoints, the CLI) and authorization of every admin
endpoint: each refusal is a clear 4xx / error message and writes nothing."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.cli import main
from storage.errors import LabelError
from storage.prompts import MAX_PROMPT_CHARS
from storage.store import Store

TABLES = ("users", "prompts", "items", "answers", "rankings", "ranking_answers", "feedback", "skips", "flags",
          "versions", "runs", "settings", "suggestions")

# Every /api operation that is NOT admin-only. Any operation missing here is treated as admin-only, so a new admin
# endpoint cannot be forgotten: a new annotator endpoint has to be added here on purpose.
NOT_ADMIN = {
    ("GET", "/api/health"),  # no token at all
    ("GET", "/api/me"),
    ("GET", "/api/items/next"),
    ("POST", "/api/items/{item_id}/ranking"),
    ("POST", "/api/answers/{answer_id}/feedback"),
    ("POST", "/api/items/{item_id}/skip"),
    ("POST", "/api/items/{item_id}/flag"),
    ("POST", "/api/generate"),
    ("POST", "/api/suggestions"),  # queued for an admin's review (app/suggestions.py)
    ("POST", "/api/me/password"),  # your own, given the current one (tests/security/test_accounts.py)
    ("POST", "/api/rankings/{ranking_id}/retract"),  # undo of your own ranking (tests/test_ui_annotate.py)
}
# The admin endpoints the issue names; the spec must still list each of them.
KNOWN_ADMIN = {
    ("POST", "/api/prompts"), ("POST", "/api/users"), ("GET", "/api/export"), ("POST", "/api/train"),
    ("GET", "/api/runs"), ("GET", "/api/runs/{run_id}"), ("POST", "/api/runs/{run_id}/cancel"),
    ("GET", "/api/versions"), ("POST", "/api/versions/{version}/deploy"),
    ("POST", "/api/users/{name}/password"), ("POST", "/api/users/{name}/token"), ("POST", "/api/users/{name}/enable"),
}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])



def rows(ctx) -> dict[str, int]:
    cur = ctx.store.db.cursor()
    return {table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def refused(r: httpx.Response, *statuses: int) -> str:
    """The error message of a refusal with one of `statuses`; fails on anything else."""
    assert r.status_code in statuses, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    message = r.json()["error"]
    assert isinstance(message, str) and message
    return message




# -- authorization ---------------------------------------------------------------------------------------------------
def test_every_admin_endpoint_refuses_annotators_and_anonymous(ctx, server, ann, api):
    spec = api().get("/api/openapi.json").json()
    operations = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops
                  if method in HTTP_METHODS}
    assert NOT_ADMIN <= operations, "the allow-list names an endpoint the API no longer has"
    admin_only = operations - NOT_ADMIN
    assert KNOWN_ADMIN <= admin_only
    before = rows(ctx)
    for method, path in sorted(admin_only):
        url = re.sub(r"\{[^}]+\}", "1", path)
        body = {} if method != "GET" else None
        refused(api().request(method, url, json=body), 401)
        refused(api(token="not-a-token").request(method, url, json=body), 401)
        assert "admin" in refused(ann.request(method, url, json=body), 403)
    for method, path in sorted(NOT_ADMIN - {("GET", "/api/health")}):
        refused(api().request(method, re.sub(r"\{[^}]+\}", "1", path)), 401)
    assert rows(ctx) == before


def test_the_local_cli_token_administers_but_cannot_label(ctx, server, sample_items, api):
    (item_id,) = sample_items(1)
    local = api(token=ctx.local_token)
    assert local.get("/api/versions").status_code == 200
    refused(local.get("/api/items/next"), 403)
    refused(local.post(f"/api/items/{item_id}/ranking", json={"ranking": [1, 2, 3, 4]}), 403)


# -- REST: generated bodies ------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def test_rankings_other_than_a_permutation_are_refused(ctx, ann, sample_items):
    sample_items(1)
    item = ann.get("/api/items/next").json()
    ids = [a["answer_id"] for a in item["answers"]]
    url = f"/api/items/{item['item_id']}/ranking"
    near_misses = st.lists(st.sampled_from([*ids, 0, -1, ids[0] + 1000, 2**63, 10**30]), max_size=6)
    wrongly_typed = st.lists(st.sampled_from([*map(str, ids), *map(float, ids), True, None]), min_size=4, max_size=4)

    @FAST
    @given(st.one_of(json_values, st.fixed_dictionaries({"ranking": st.one_of(json_values, near_misses,
                                                                               wrongly_typed)})))
    def check(body):
        ranking = body.get("ranking") if isinstance(body, dict) and body.keys() == {"ranking"} else None
        assume(not (isinstance(ranking, list) and all(type(a) is int for a in ranking)
                    and sorted(ranking) == sorted(ids)))
        refused(ann.post(url, json=body), 422)

    check()
    assert ctx.store.labels.counts().rankings == 0
    assert ann.post(url, json={"ranking": ids}).status_code == 201  # the one accepted body


def test_raw_bytes_that_are_not_a_body_are_refused(ctx, ann, boss, sample_items):
    (item_id,) = sample_items(1)
    before = rows(ctx)

    @FAST
    @given(st.binary(max_size=300))
    def check(raw):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        assume(not isinstance(parsed, dict))  # a JSON object could be a valid body by chance
        headers = {"content-type": "application/json"}
        refused(ann.post(f"/api/items/{item_id}/ranking", content=raw, headers=headers), 400, 422)
        refused(boss.post("/api/prompts", content=raw, headers=headers), 400, 422)

    check()
    assert rows(ctx) == before


def valid_prompt(text) -> bool:
    return isinstance(text, str) and bool(text.strip()) and len(text.strip()) <= MAX_PROMPT_CHARS and "\0" not in text


def test_prompts_are_added_only_when_every_one_is_valid(ctx, boss):
    prompt = st.one_of(st.text(max_size=30), st.just("  \t\n "), st.just("x" * (MAX_PROMPT_CHARS + 1)),
                       st.just("a\x00b"), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))

    @FAST
    @given(st.lists(prompt, max_size=5))
    def check(prompts):
        before = ctx.store.prompts.count()
        r = boss.post("/api/prompts", json={"prompts": prompts})
        if prompts and all(valid_prompt(p) for p in prompts):
            assert r.status_code == 201, r.text
            assert ctx.store.prompts.count() == before + r.json()["added"]
        else:
            refused(r, 422)
            assert ctx.store.prompts.count() == before

    check()


# -- REST: hand-picked abuse -----------------------------------------------------------------------------------------
def post_raw(c: httpx.Client, url: str, raw: bytes) -> httpx.Response:
    return c.post(url, content=raw, headers={"content-type": "application/json"})


def test_bad_bodies_unknown_ids_and_huge_uploads_write_nothing(ctx, ann, boss, sample_items):
    (item_id,) = sample_items(1)
    answer_id = ann.get("/api/items/next").json()["answers"][0]["answer_id"]
    before = rows(ctx)
    lone_surrogate = b'"a\\ud800b"'  # valid JSON, but no UTF-8 string: it must not reach DuckDB
    for url, c, raw in [
        ("/api/prompts", boss, b'{"prompts": [' + lone_surrogate + b"]}"),
        (f"/api/items/{item_id}/flag", ann, b'{"reason": ' + lone_surrogate + b"}"),
        (f"/api/items/{item_id}/skip", ann, b'{"reason": ' + lone_surrogate + b"}"),
        ("/api/users", boss, b'{"name": ' + lone_surrogate + b"}"),
        ("/api/generate", ann, b'{"prompt": ' + lone_surrogate + b"}"),
        (f"/api/items/{item_id}/ranking", ann, b'{"ranking": "\xff\xfe"}'),  # invalid UTF-8
        (f"/api/items/{item_id}/ranking", ann, b"[" * 50_000 + b"]" * 50_000),  # nested past the parser's depth
        (f"/api/items/{item_id}/ranking", ann, b'{"ranking": [1, 2, 3, 4],'),  # truncated
        ("/api/generate", ann, b'{"prompt": "x", "max_new_tokens": NaN}'),
    ]:
        refused(post_raw(c, url, raw), 400, 422)
    bad_json = [
        (ann, f"/api/answers/{answer_id}/feedback", {"value": 1}),
        (ann, f"/api/answers/{answer_id}/feedback", {"value": "UP"}),
        (ann, f"/api/items/{item_id}/skip", {"reason": 5}),
        (ann, f"/api/items/{item_id}/flag", {"reason": ""}),
        (ann, f"/api/items/{item_id}/flag", {"reason": "x" * 2001}),
        (ann, "/api/generate", {"prompt": "x" * 1_000_000}),
        (ann, "/api/generate", {"prompt": "hi", "max_new_tokens": 0}),
        (ann, "/api/generate", {"prompt": "hi", "max_new_tokens": "5"}),
        (boss, "/api/users", {"name": "x'; DROP TABLE users; --"}),
        (boss, "/api/users", {"name": "<script>", "role": "annotator"}),
        (boss, "/api/users", {"name": "eve", "role": "root"}),
        (boss, "/api/users", {"name": "eve", "password": "short"}),
        (boss, "/api/prompts", {"prompts": "a single string"}),
        (boss, "/api/prompts", {"prompts": []}),
        (boss, "/api/train", [1, 2]),
        (boss, "/api/train", {"algorithm": "'; DROP TABLE runs; --"}),
        (boss, "/api/train", {"no_such_knob": 1}),
    ]
    for c, url, body in bad_json:
        refused(c.post(url, json=body), 422)
    for c, method, url in [
        (ann, "POST", "/api/items/999999/ranking"), (ann, "POST", "/api/items/-1/skip"),
        (ann, "POST", f"/api/items/{2**70}/flag"), (ann, "POST", f"/api/answers/{2**64}/feedback"),
        (boss, "GET", "/api/runs/999999"), (boss, "POST", "/api/runs/999999/cancel"),
        (boss, "POST", "/api/versions/999999/deploy"),
    ]:
        body = {"ranking": [1, 2, 3, 4]} if url.endswith("ranking") else {"value": "up"} if "feedback" in url \
            else {"reason": "x"} if url.endswith("flag") else None
        refused(c.request(method, url, json=body), 404)
    refused(ann.post("/api/items/abc/ranking", json={"ranking": [1]}), 422)
    refused(ann.post("/api/generate", json={"prompt": "hi", "version": 999999}), 404)
    refused(boss.get("/api/export", params={"format": "csv'; --"}), 422)
    huge = boss.post("/api/prompts", json={"prompts": ["y" * 3_000_000]})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]

    def chunks():  # no content-length: the limit must hold for a streamed upload too
        for _ in range(40):
            yield b"z" * 100_000

    refused(boss.post("/api/prompts", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert rows(ctx) == before


def test_413_for_a_declared_length_is_a_json_error(boss):
    refused(boss.post("/api/prompts", json={"prompts": ["y" * 3_000_000]}), 413)


def test_sql_and_html_in_prompts_are_stored_as_text_and_shown_escaped(ctx, boss, ann, accounts):
    from app.ui import annotate
    from storage.items import AnswerRecord

    nasty = ["'); DROP TABLE prompts; --", "Robert\"); DELETE FROM users WHERE (\"1\"=\"1",
             "<script>alert('x')</script> What is 2 + 2?", '<img src=x onerror="alert(1)"> hi', "%s %d {0} $1 ? ;"]
    r = boss.post("/api/prompts", json={"prompts": nasty})
    assert r.status_code == 201 and r.json()["added"] == len(nasty)
    stored = {text for (text,) in ctx.store.db.cursor().execute("SELECT text FROM prompts").fetchall()}
    assert set(nasty) <= stored
    assert ctx.store.users.count() == 3  # nothing was executed
    prompt_id = ctx.store.db.cursor().execute("SELECT prompt_id FROM prompts WHERE text = ?", [nasty[2]]).fetchone()[0]
    ctx.store.items.add(prompt_id, 0, {}, [AnswerRecord(t, 1, "eos", -1.0) for t in ("a", "b", "c", "d")])
    assert ann.get("/api/items/next").json()["prompt"] == nasty[2]  # the API returns data as data
    shown = annotate.next_view(ctx, "ann").prompt  # the UI shows the same item, as text
    assert "<script>" not in shown and "&lt;script&gt;" in shown


# -- Gradio: the Annotate tab's endpoints ----------------------------------------------------------------------------
def test_gradio_endpoints_refuse_bad_input_and_write_nothing(ctx, server, accounts, sample_items):
    from gradio_client import Client

    sample_items(2)
    with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a plain Exception on a failed login)
        Client(f"{server.url}/ui/", auth=("x' OR '1'='1", "x' OR '1'='1"), verbose=False)
    ui = Client(f"{server.url}/ui/", auth=("ann", "ann-password"), verbose=False)
    before = rows(ctx)

    def refusal(result) -> str:
        """The Annotate tab answers a refused action with one inline message (app/ui/blocks.py), not an error."""
        (message,) = [str(x) for x in result if "pl-refusal" in str(x)]
        return message

    with pytest.raises(Exception, match="not in the list of choices"):  # Gradio's own check of the choices
        ui.predict("1", "2", "3", "9", None, None, None, None, api_name="/submit_ranking")
    with pytest.raises(Exception, match="not in the list of choices"):
        ui.predict("1", "2", "3", "4", "<script>", None, None, None, api_name="/submit_ranking")
    for args in [("x", "2", "3", "4"), ("1", "1", "2", "3"), ("1", None, "2", "3")]:
        try:
            message = refusal(ui.predict(*args, None, None, None, None, api_name="/submit_ranking"))
        except Exception as exc:  # noqa: BLE001 - "x" is refused by Gradio's own check of the choices
            message = str(exc)
        assert re.search("not in the list of choices|no item to rank", message), message
    assert "no item to flag" in refusal(ui.predict("spam", api_name="/flag"))  # no item shown yet in this session
    ui.predict(api_name="/next_item")
    assert "say why" in refusal(ui.predict("   ", api_name="/flag"))
    # A shared rank is a tie now; a tie with an answer left unranked is refused (nothing to fill in).
    assert "Answer 4 has none" in refusal(ui.predict("1", "1", "2", None, None, None, None, None,
                                                     api_name="/submit_ranking"))
    with pytest.raises(Exception, match="not in the list of choices"):
        ui.predict("1", "2", "3", "", None, None, None, None, api_name="/submit_ranking")
    assert rows(ctx) == before


def test_flag_reason_from_the_ui_is_capped_like_the_rest_api(ctx, accounts, sample_items):
    from app.ui import annotate

    sample_items(1)
    view = annotate.next_view(ctx, "ann")  # the handler behind the /flag endpoint, called as blocks.py calls it
    with pytest.raises(LabelError, match="limit is 2000"):  # blocks.py shows storage refusals as a toast
        annotate.flag(ctx, "ann", view.session, "x" * 1_000_000)
    assert ctx.store.labels.counts().flags == 0


# -- CLI ---------------------------------------------------------------------------------------------------------------
def test_cli_refuses_bad_files_and_names_without_a_traceback(tmp_path, capsys):
    data_dir = tmp_path / "data"
    Store.open(data_dir).close()  # the CLI refuses a data dir that holds no store (`prefloop init` makes one)
    assert main(["prompts", "import", str(_write(tmp_path / "ok.jsonl", b'{"prompt": "fine"}\n')),
                 "--data-dir", str(data_dir)]) == 0
    bad_files = {
        "utf8.csv": b"prompt\nfine\n\xff\xfe broken\n",
        "huge.jsonl": json.dumps({"prompt": "y" * 1_000_000}).encode() + b"\n",
        "surrogate.jsonl": b'{"prompt": "a\\ud800b"}\n',
        "nul.jsonl": b'{"prompt": "a\\u0000b"}\n',
        "types.jsonl": b'{"prompt": 5}\n{"prompt": null}\n{"text": "x"}\n[1]\n',
        "garbage.parquet": bytes(range(256)) * 8,
        "empty.csv": b"",
        "nocolumn.csv": b"text\nhello\n",
        "array.json": b'[{"prompt": "ok"}, {"prompt": ["not", "text"]}]',
        "prompts.txt": b"just text\n",
    }
    for name, raw in bad_files.items():
        code = main(["prompts", "import", str(_write(tmp_path / name, raw)), "--data-dir", str(data_dir)])
        err = capsys.readouterr().err
        assert code == 3, (name, err)  # bad input file
        assert "nothing imported" in err and name in err and "Traceback" not in err, name
    for name in ("x'; DROP TABLE users; --", "<b>", "", "a" * 65, "名前"):
        assert main(["users", "add", name, "--data-dir", str(data_dir)]) == 1
        assert "user name must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["users", "add", "eve", "--role", "root", "--data-dir", str(data_dir)])
    assert exited.value.code == 2
    with Store.open(data_dir) as store:
        assert store.prompts.count() == 1 and store.users.count() == 0
    sql = tmp_path / "sql.jsonl"
    sql.write_text(json.dumps({"prompt": "'); DROP TABLE prompts; --"}) + "\n")
    assert main(["prompts", "import", str(sql), "--data-dir", str(data_dir)]) == 0
    with Store.open(data_dir) as store:
        assert store.prompts.count() == 2


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path
