"""Issue 8 item 2 (the login half): the password check runs off the event loop, and guessing is throttled per user
name, per address, and for API tokens, with a message that names the wait. A real server on a free port; the
throttle's clock is one the test moves (no sleeping)."""

from __future__ import annotations

import threading

import httpx
import pytest

from app.login import LockedOut, LoginPolicy, LoginThrottle

TIMEOUT_S = 120  # scrypt on 2 shared cores; generous, never a timing assertion


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_server(ctx, accounts):
    from app.server import RunningServer, create_app

    running = []

    def make(throttle: LoginThrottle) -> str:
        running.append(RunningServer(create_app(ctx, throttle=throttle), "127.0.0.1", 0).start())
        return running[-1].url

    yield make
    for server in running:
        server.stop()


def login(url: str, name: str, password: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/ui/login", data={"username": name, "password": password, **extra}, timeout=TIMEOUT_S)


def test_wrong_guesses_lock_the_name_out_and_the_message_names_the_wait(make_server, clock):
    url = make_server(LoginThrottle(LoginPolicy(), clock))
    for _ in range(LoginPolicy().user_failures):
        r = login(url, "ann", "not-her-password")
        assert r.status_code == 401 and "wrong user name or password" in r.json()["error"]
    r = login(url, "ann", "ann-password")  # the right password, during the lockout
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "too many failed logins for 'ann'; try again in 30 s"
    assert r.headers["retry-after"] == "30" and "set-cookie" not in r.headers
    page = login(url, "ANN", "ann-password", next="/ui/")  # the login page shows it too (names are case-blind)
    assert page.status_code == 429 and "too many failed logins for &#x27;ANN&#x27;; try again in 30 s" in page.text
    assert login(url, "bob", "bob-password").status_code == 200  # one name's lockout is not another's

    clock.now += 29
    assert "try again in 1 s" in login(url, "ann", "ann-password").json()["error"]
    clock.now += 2
    r = login(url, "ann", "ann-password")
    assert r.status_code == 200 and r.json() == {"success": True}
    session = httpx.get(f"{url}/ui/config", cookies=r.cookies, timeout=TIMEOUT_S)
    assert session.status_code == 200


def test_the_lockout_doubles_while_the_guessing_goes_on(clock):
    throttle = LoginThrottle(LoginPolicy(user_failures=2, address_failures=100, max_lockout_s=100), clock)
    waits = []
    for _ in range(6):
        try:
            throttle.begin_login("ann", "10.0.0.1")
        except LockedOut as exc:
            waits.append(exc.retry_after_s)
            clock.now += exc.retry_after_s
            throttle.begin_login("ann", "10.0.0.1")  # once the wait is over: one more (failed) guess
    assert waits == [30, 60, 100, 100]  # doubling, capped at max_lockout_s
    clock.now += LoginPolicy().forget_after_s + 101
    throttle.begin_login("ann", "10.0.0.1")  # failures that old are forgotten: counting starts again at one...
    throttle.begin_login("ann", "10.0.0.1")  # ...so this second guess is let in (and locks the name again)
    with pytest.raises(LockedOut, match="try again in 30 s"):
        throttle.begin_login("ann", "10.0.0.1")


def test_one_address_spraying_many_names_is_locked_out(make_server, clock):
    policy = LoginPolicy()
    url = make_server(LoginThrottle(policy, clock))
    for i in range(policy.address_failures):
        assert login(url, f"nobody-{i}", "password1").status_code == 401
    r = login(url, "bob", "bob-password")
    assert r.status_code == 429 and r.json()["error"] == "too many failed logins from 127.0.0.1; try again in 30 s"
    clock.now += 31
    assert login(url, "bob", "bob-password").status_code == 200


def test_guessing_api_tokens_is_throttled_per_address(make_server, clock, accounts):
    url = make_server(LoginThrottle(LoginPolicy(token_failures=3), clock))
    seen = {"authorization": f"Bearer {accounts['ann'][1]}"}
    unseen = {"authorization": f"Bearer {accounts['bob'][1]}"}  # valid, but not used before the lockout
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        assert client.get("/api/items/next", headers=seen).status_code in (200, 204)  # successes do not count
        for i in range(3):
            assert client.get("/api/items/next", headers={"authorization": f"Bearer guess-{i}"}).status_code == 401
        r = client.get("/api/items/next", headers={"authorization": "Bearer guess-4"})
        assert r.status_code == 429
        assert r.json()["error"] == "too many attempts with an invalid API token from 127.0.0.1; try again in 30 s"
        assert r.headers["retry-after"] == "30"
        assert client.get("/api/items/next", headers=unseen).status_code == 429  # unknown to the throttle: refused
        assert client.get("/api/health").status_code == 200  # no token, no throttle: health always answers
        # The guesser shares the address with people whose tokens work: they are not locked out with it.
        assert client.get("/api/items/next", headers=seen).status_code in (200, 204)
        clock.now += 31
        assert client.get("/api/items/next", headers=unseen).status_code in (200, 204)


def test_a_token_that_stops_working_loses_its_pass_through_a_lockout(make_server, clock, accounts, ctx):
    url = make_server(LoginThrottle(LoginPolicy(token_failures=2), clock))
    ann = {"authorization": f"Bearer {accounts['ann'][1]}"}
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        assert client.get("/api/items/next", headers=ann).status_code in (200, 204)
        client.get("/api/items/next", headers={"authorization": "Bearer guess-0"})
        ctx.store.users.set_disabled("ann", True)  # ann's token is refused from now on: it no longer passes the lockout
        assert client.get("/api/items/next", headers=ann).status_code == 401  # the second failure: locked
        assert client.get("/api/items/next", headers=ann).status_code == 429


def test_parallel_password_guessing_does_not_stall_the_server(make_server, clock):
    # Limits out of reach: this test is about where scrypt runs, not about the lockout.
    url = make_server(LoginThrottle(LoginPolicy(user_failures=10**6, address_failures=10**6), clock))
    stop = threading.Event()
    guesses, unexpected = [0] * 8, []

    def guess(slot: int) -> None:
        with httpx.Client(timeout=TIMEOUT_S) as client:
            while not stop.is_set():
                r = client.post(f"{url}/ui/login", data={"username": "ann", "password": f"guess-{slot}"})
                if r.status_code != 401:
                    unexpected.append(r.status_code)
                guesses[slot] += 1

    threads = [threading.Thread(target=guess, args=(slot,), daemon=True) for slot in range(8)]
    for thread in threads:
        thread.start()
    try:
        while min(guesses) == 0:  # every guesser is under way (each has had a guess answered)
            assert all(t.is_alive() for t in threads)
            httpx.get(f"{url}/api/health", timeout=TIMEOUT_S)
        answers = [httpx.get(f"{url}/api/health", timeout=TIMEOUT_S).status_code for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert answers == [200] * 5
    assert unexpected == [] and min(guesses) >= 1


def test_login_bodies_are_small_forms(make_server, clock):
    url = make_server(LoginThrottle(LoginPolicy(), clock))
    r = httpx.post(f"{url}/ui/login", json={"username": "ann", "password": "ann-password"}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and "as a form" in r.json()["error"]
    r = httpx.post(f"{url}/ui/login", data={"username": "ann", "password": "x" * 20_000}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and "over 16384 bytes" in r.json()["error"]


def test_the_login_form_logs_a_browser_in_and_goes_only_to_our_own_pages(make_server, clock):
    url = make_server(LoginThrottle(LoginPolicy(), clock))
    page = httpx.get(f"{url}/ui/", timeout=TIMEOUT_S)
    assert page.status_code == 200 and 'action="/ui/login"' in page.text and "<script" not in page.text
    r = login(url, "boss", "boss-password", next="/admin/")
    assert r.status_code == 303 and r.headers["location"] == "/admin/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    r = login(url, "boss", "boss-password", next="https://evil.example/")
    assert r.status_code == 303 and r.headers["location"] == "/ui/"  # no open redirect
    r = login(url, "boss", "wrong-password", next="/ui/")
    assert r.status_code == 401 and "wrong user name or password" in r.text and 'value="boss"' in r.text
