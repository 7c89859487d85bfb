"""Who is asking: bearer tokens for the API, server-side sessions for the browser, CSRF, login rate limits.

**Sessions are server-side.** A browser that logs in with its token gets a random 256-bit
session id in an ``HttpOnly; Secure; SameSite=Strict`` cookie (``__Host-`` prefix: no Domain,
Path ``/``). The service keeps, in memory only, the session's token and CSRF secret, and
re-authenticates that token on every request: revoking the user ends its sessions at once (an
HMAC-signed cookie would stay valid until it expired), logging out deletes the session, and
nothing secret is ever in the cookie. A restart logs everyone out, which is acceptable for an
operator console.

**CSRF.** Every state-changing form carries the session's CSRF token (the login form a
double-submit token bound to a pre-login cookie); a session-authenticated POST to the API must
send it in ``X-CSRF-Token``. Bearer-token requests need none: a browser never attaches a bearer
header by itself.

**Rate limits.** Failed logins count per client address, per (address, user id) and per user id
(the public ``fg_<id>`` part of a token): after ``max_failures`` within ``window`` seconds further
attempts get 429 with ``Retry-After`` until the window slides past them. An address that failed
too often is refused outright, whatever it sends; a user id that failed too often from elsewhere
only refuses further *wrong* tokens. The id is public, so a block keyed by it alone would let an
outsider lock the named user out of the dashboard: the user's right token, from an address that
is not itself blocked, always gets in (see :func:`check_login`). Bad bearer tokens are counted per address too
(429 once blocked), but a valid token is never refused: API tokens carry 256 random bits, so
the limit is there to stop log noise, not guessing, and must not let a flood lock out a shared
address.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from starlette.requests import Request

from server.control.errors import Forbidden, NotAuthenticated, RateLimited
from server.control.users import User, UserStore, role_at_least

SESSION_COOKIE = "__Host-fedguard_session"
LOGIN_COOKIE = "__Host-fedguard_login"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = 8 * 3600.0


@dataclass(frozen=True)
class Principal:
    """An authenticated request: the user, how it authenticated, and (browser) its CSRF token."""

    user: User
    via: str  # "bearer" | "session"
    csrf: str | None = None
    session_id: str | None = None


@dataclass
class _Session:
    token: str
    csrf: str
    expires: float


class Sessions:
    """In-memory, thread-safe browser sessions (see the module docstring for why server-side)."""

    def __init__(self, ttl: float = SESSION_TTL) -> None:
        self.ttl = ttl
        self._by_id: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def create(self, token: str) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
            self._by_id[sid] = _Session(token, csrf, now + self.ttl)
        return sid, csrf

    def get(self, sid: str) -> _Session | None:
        with self._lock:
            s = self._by_id.get(sid)
            if s is None or s.expires <= time.time():
                self._by_id.pop(sid, None)
                return None
            s.expires = time.time() + self.ttl
            return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


class RateLimiter:
    """Sliding-window failure counter per key (client address, user id)."""

    def __init__(self, max_failures: int = 5, window: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def retry_after(self, keys: list[str]) -> int:
        """Seconds until any of ``keys`` may try again (0: allowed now)."""
        now = time.time()
        with self._lock:
            wait = 0.0
            for k in keys:
                q = self._recent(k, now)
                if len(q) >= self.max_failures:
                    wait = max(wait, q[0] + self.window - now)
            return int(wait) + 1 if wait > 0 else 0

    def fail(self, keys: list[str]) -> None:
        now = time.time()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


def user_key(token: str) -> str | None:
    """The rate-limit key of the user a token claims to be (its public id), if it looks like one."""
    parts = token.split("_")
    if len(parts) >= 3 and parts[0] == "fg" and 0 < len(parts[1]) <= 32:
        return f"user:{parts[1]}"
    return None


def client_key(request: Request) -> str:
    return f"addr:{request.client.host if request.client else 'unknown'}"


@dataclass(frozen=True)
class LoginAttempt:
    """The outcome of :func:`check_login`: a user, or a refusal (``retry_after`` > 0: rate-limited, not audited)."""

    user: User | None
    retry_after: int
    target: str  # what a failure is audited under: the claimed user id, else the address


def check_login(limiter: RateLimiter, request: Request, token: str, users: UserStore) -> LoginAttempt:
    """Check a dashboard log-in against the limiter (module docstring): brute force slows, nobody is locked out."""
    addr = client_key(request)
    claimed = user_key(token)
    local = [addr] + ([f"{addr}|{claimed}"] if claimed else [])
    wait = limiter.retry_after(local)
    if wait:
        return LoginAttempt(None, wait, claimed or addr)
    user = users.authenticate(token)
    if user is not None:
        limiter.clear(f"{addr}|{claimed}")
        if claimed:
            limiter.clear(claimed)
        return LoginAttempt(user, 0, claimed or addr)
    wait = limiter.retry_after([claimed]) if claimed else 0
    if wait:  # this user id is under attack from elsewhere: further wrong tokens are refused unheard
        return LoginAttempt(None, wait, claimed or addr)
    limiter.fail(local + ([claimed] if claimed else []))
    return LoginAttempt(None, 0, claimed or addr)


def authenticate(request: Request, users: UserStore, sessions: Sessions, bearer_limit: RateLimiter) -> Principal:
    """The request's principal from its bearer header or session cookie; NotAuthenticated otherwise."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("malformed Authorization header: use `Bearer <token>`")
        user = users.authenticate(token.strip())
        if user is None:  # a valid token always works: a flood of bad ones must not lock out a shared address
            keys = [client_key(request)]
            wait = bearer_limit.retry_after(keys)
            if wait:
                raise RateLimited("too many bad tokens from this address", retry_after=wait)
            bearer_limit.fail(keys)
            raise NotAuthenticated("invalid or revoked token")
        return Principal(user, "bearer")
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        session = sessions.get(sid)
        user = users.authenticate(session.token) if session else None
        if session is None or user is None:
            if session is not None:
                sessions.drop(sid)
            raise NotAuthenticated("session expired or user revoked: log in again")
        return Principal(user, "session", session.csrf, sid)
    raise NotAuthenticated()


def check_csrf(principal: Principal, supplied: str | None) -> None:
    """Forbidden unless a session-authenticated request carries its session's CSRF token."""
    if principal.via != "session":
        return
    if not supplied or not principal.csrf or not hmac.compare_digest(supplied.encode(), principal.csrf.encode()):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


def has_role(principal: Principal, needed: str) -> bool:
    return role_at_least(principal.user.role, needed)


def role_denied(principal: Principal, needed: str) -> Forbidden:
    """The error for a principal whose role is below ``needed`` (the API and the dashboard say the same)."""
    return Forbidden(f"the {principal.user.role} role may not do this: it needs {needed} or above")
