"""Who may change state from the console: local users (PBKDF2 password hashes) or the admin token.

Reading pages needs no login (the console listens on localhost by default); every POST
that changes something does. A login sets a session cookie signed with a key made at start
(HttpOnly, SameSite=Strict, so another site cannot post with it); API clients send
``Authorization: Bearer <admin_token>`` instead. Run ``python -m pacs_node.web.auth`` to make
a password hash for config.toml.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
import time

from ..config import HttpSettings

ITERATIONS = 600_000
SESSION_COOKIE = "pacs_node_session"
SESSION_SECONDS = 12 * 3600


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"pbkdf2_sha256${iterations}${b64(salt)}${b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        unb64 = lambda s: base64.b64decode(s + "=" * (-len(s) % 4))  # noqa: E731
        expected = unb64(digest)
        actual = hashlib.pbkdf2_hmac("sha256", password.encode(), unb64(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class Auth:
    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.users = {u.name: u.password_hash for u in settings.users}
        self._key = secrets.token_bytes(32)

    @property
    def configured(self) -> bool:
        return bool(self.users or self.settings.admin_token)

    def check_login(self, name: str, password: str) -> str | None:
        """The user name on success. The admin token also logs in (as 'admin-token')."""
        token = self.settings.admin_token
        if token and not name and hmac.compare_digest(password.encode(), token.encode()):
            return "admin-token"
        encoded = self.users.get(name)
        if encoded is None:
            verify_password(password, hash_password("x", iterations=1000))  # similar work for unknown names
            return None
        return name if verify_password(password, encoded) else None

    def session_cookie(self, user: str) -> str:
        expires = str(int(time.time()) + SESSION_SECONDS)
        body = f"{user}|{expires}"
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        return f"{body}|{mac}"

    def user_from_cookie(self, value: str | None) -> str | None:
        if not value or value.count("|") != 2:
            return None
        user, expires, mac = value.split("|")
        good = hmac.new(self._key, f"{user}|{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, good):
            return None
        try:
            return user if int(expires) > time.time() else None
        except ValueError:
            return None

    def user_from_bearer(self, header: str | None) -> str | None:
        token = self.settings.admin_token
        if not token or not header or not header.lower().startswith("bearer "):
            return None
        return "admin-token" if hmac.compare_digest(header[7:].strip().encode(), token.encode()) else None


def main() -> int:
    # from a prompt, or one line of stdin (never argv: other users could read it in ps)
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
