"""Who is logged in to the browser UI, and who may still try: sessions and the failed-login throttle.

One session serves both Gradio apps (the annotator UI at /ui and the Admin UI at /admin): `app.web_guard` checks it
on every request, before Gradio runs, and looks its user up in the store each time, so disabling or removing a user
takes both apps away at once. Sessions live in memory: a restart logs everyone out.

Password guessing (issue 8 item 2) is slowed per user name and per client address: after `user_failures` failed
logins for one name (or `address_failures` from one address) further attempts are refused, the right password
included, for `lockout_s`, doubling with each further failure up to `max_lockout_s`.

Invalid API tokens are counted per address too, but a lockout there refuses only tokens the server has not seen
accepted: behind a reverse proxy every client shares one address, and a token-guesser there must not lock out the
annotators and the local CLI whose tokens work (the API marks each accepted token in the request's scope under
`TOKEN_ACCEPTED`; the throttle keeps their sha256, never the token).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.users import User, hash_token

TOKEN_ACCEPTED = "prefloop.token_accepted"  # the ASGI scope key where the API notes that the request's token was valid


@dataclass(frozen=True)
class LoginPolicy:
    """The numbers behind sessions and lockouts, each with its reason."""

    # A person who forgot their password tries a few variants; five failures in a row for one name is guessing.
    user_failures: int = 5
    # One address can be a shared office NAT with several people mistyping, so it gets more room than one name;
    # it stops a guesser who sprays one password across many names.
    address_failures: int = 20
    # API tokens are 256-bit random strings: nobody mistypes one 50 times. This only caps the store lookups a
    # token-guesser costs the server; scripts with a stale token still get 50 clear 401s first.
    token_failures: int = 50
    # The first lockout: long enough to make guessing hopeless (a few guesses a minute), short enough for a person.
    lockout_s: float = 30.0
    # Each further failure doubles the wait up to this cap: a locked-out person waits at most 15 minutes.
    max_lockout_s: float = 15 * 60.0
    # Failures older than this are forgotten, so a few typos a week never add up to a lockout.
    forget_after_s: float = 60 * 60.0
    # Names and addresses tracked at once; the oldest are dropped beyond it (memory stays bounded under spraying).
    max_tracked: int = 10_000
    # A browser session lasts a working week; a stolen cookie stops working within it.
    session_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("user_failures", "address_failures", "token_failures", "max_tracked"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lockout_s", "max_lockout_s", "forget_after_s", "session_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class LockedOut(Exception):
    """Too many failed attempts: the message names who is locked out and for how long."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Failure counts per key ("user", name) / ("address", ip) / ("token", ip), with a clock tests can drive, and
    the digests of API tokens recently accepted (a token lockout lets those through)."""

    def __init__(self, policy: LoginPolicy = LoginPolicy(), clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self._records: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._accepted: OrderedDict[str, float] = OrderedDict()  # sha256 of a token -> when it was last accepted
        self._lock = threading.Lock()

    def begin_login(self, name: str, address: str) -> None:
        """Refuse (LockedOut) while the name or the address is locked out; otherwise count this attempt as a
        failure until `login_succeeded` says otherwise, so parallel guesses cannot all slip in before the first
        one is judged."""
        user_key, address_key = ("user", name.casefold()), ("address", address)
        with self._lock:
            now = self.clock()
            self._refuse_if_locked(user_key, f"for {name!r}", now)
            self._refuse_if_locked(address_key, f"from {address}", now)
            self._fail(user_key, self.policy.user_failures, now)
            self._fail(address_key, self.policy.address_failures, now)

    def login_succeeded(self, name: str, address: str) -> None:
        """The right password: the name starts afresh; the address's provisional failure is taken back."""
        with self._lock:
            self._records.pop(("user", name.casefold()), None)
            record = self._records.get(("address", address))
            if record is not None:
                record.count = max(0, record.count - 1)
                if record.count < self.policy.address_failures:
                    record.locked_until = 0.0

    def check_token(self, address: str, token: str) -> None:
        """LockedOut while `address` has sent too many invalid API tokens, unless `token` was accepted within
        `forget_after_s` (a valid token is never refused because someone else guessed from the same address)."""
        digest = hash_token(token)
        with self._lock:
            now = self.clock()
            accepted = self._accepted.get(digest)
            if accepted is not None and now - accepted <= self.policy.forget_after_s:
                return
            self._refuse_if_locked(("token", address), f"with an invalid API token from {address}", now)

    def token_accepted(self, token: str) -> None:
        with self._lock:
            digest = hash_token(token)
            self._accepted.pop(digest, None)
            self._accepted[digest] = self.clock()  # most recently accepted last: the oldest go first
            while len(self._accepted) > self.policy.max_tracked:
                self._accepted.popitem(last=False)

    def token_failed(self, address: str, token: str) -> None:
        """An invalid token (also one revoked or disabled since it was accepted: it loses its pass)."""
        with self._lock:
            self._accepted.pop(hash_token(token), None)
            self._fail(("token", address), self.policy.token_failures, self.clock())

    def _refuse_if_locked(self, key: tuple[str, str], who: str, now: float) -> None:
        record = self._records.get(key)
        if record is not None and record.locked_until > now:
            wait = math.ceil(record.locked_until - now)
            what = "attempts" if key[0] == "token" else "failed logins"
            raise LockedOut(f"too many {what} {who}; try again in {wait} s", wait)

    def _fail(self, key: tuple[str, str], limit: int, now: float) -> None:
        record = self._records.pop(key, None)
        if record is None or now - record.last > self.policy.forget_after_s:
            record = _Failures()
        record.count += 1
        record.last = now
        if record.count >= limit:
            doublings = min(record.count - limit, 32)  # 2**32 x 30 s is past any cap; keeps the float finite
            record.locked_until = now + min(self.policy.lockout_s * 2**doublings, self.policy.max_lockout_s)
        self._records[key] = record  # most recently failed last: the oldest go first below
        while len(self._records) > self.policy.max_tracked:
            self._records.popitem(last=False)


@dataclass(frozen=True)
class Session:
    user_id: int
    expires: float


@dataclass
class Sessions:
    """Browser sessions: an unguessable cookie value -> the user it was issued to, until it expires or is ended."""

    lifetime_s: float = LoginPolicy.session_s
    clock: Callable[[], float] = time.monotonic
    _by_token: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            for old in [t for t, s in self._by_token.items() if s.expires <= now]:
                del self._by_token[old]
            self._by_token[token] = Session(user.user_id, now + self.lifetime_s)
        return token

    def user_id(self, token: str) -> int | None:
        """Whose session `token` is, or None (unknown, ended or expired)."""
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if session.expires <= self.clock():
                del self._by_token[token]
                return None
            return session.user_id

    def end(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def end_user(self, user_id: int) -> int:
        """End every session of one user (disabling them, a new password); returns how many there were."""
        with self._lock:
            tokens = [t for t, s in self._by_token.items() if s.user_id == user_id]
            for token in tokens:
                del self._by_token[token]
        return len(tokens)
