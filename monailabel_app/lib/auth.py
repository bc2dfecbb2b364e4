"""Optional login, spoken the way 3D Slicer's MONAI Label module already speaks it.

The module (its client in Project-MONAI/MONAILabel, the Slicer plugin's ``MONAILabelLib``) asks
``GET /auth/`` whether login is on (``{"enabled": true}``), then posts the user name and password of its settings
as a form (``username``, ``password``, ``grant_type=password``) to ``POST /auth/token`` and sends the answer's
``access_token`` as ``Authorization: Bearer <token>`` on every later request; it checks a token with
``GET /auth/token/valid``. monailabel itself forwards the form to a Keycloak realm; this app answers it from a
local user file instead, which a small team can run without another server:

* users: a JSON file (``--conf users <file>``, default ``<app>/model/users.json``) holding bcrypt hashes,
  written by ``python monailabel_app/lib/auth.py add-user NAME`` (asks for the password; ``--users FILE``);
* tokens: HS256 JWTs (PyJWT) signed with a random key kept next to the user file (``<file>.key``, mode 0600,
  created at the first start), valid ``--conf token_hours`` hours (default 12);
* password guessing: after ``LoginThrottle.FREE`` (5) wrong passwords in a row for one user name (known or not),
  that name is refused with 429 and ``Retry-After`` for 30 s, doubling with each further failure up to 15 min;
  a correct login resets it. The wait applies to the name, not the caller (every caller is 127.0.0.1 here);
* roles: ``annotator`` (the default: segment, label, sessions, Next Sample, train) or ``admin`` (also what
  loses data, changes the server or hands out what was learnt from the studies: deleting images and labels,
  ``/reload``, ``/logs/``, ``GET /model/...``), set with ``add-user --role``.
  An entry without a role is an annotator. The server's own processes act as admin.

The check itself is the request guard in ``lib/server.py``; this module holds the user file and the tokens.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from typing import Dict, Optional

import bcrypt
import jwt

ALGORITHM = "HS256"
SERVICE = "<server>"  # subject of the service token; not a valid user name, so no user can have it
MIN_PASSWORD = 8
ROLES = ("annotator", "admin")


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename), readable by the owner only."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", text=True)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_users(path: str) -> Dict[str, Dict]:
    """``{name: {"hash": bcrypt hash}}`` from the user file; an error naming the file when it is unusable."""
    try:
        with open(path) as f:
            users = json.load(f).get("users", {})
    except FileNotFoundError:
        raise FileNotFoundError(f"No user file {path}: add a user with `python monailabel_app/lib/auth.py add-user NAME`")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"The user file {path} is not valid JSON of the form {{'users': {{...}}}}: {e}") from None
    if not isinstance(users, dict) or not all(isinstance(u, dict) and u.get("hash") for u in users.values()):
        raise ValueError(f"The user file {path} has entries without a password hash")
    return users


def add_user(path: str, name: str, password: str, role: str = "annotator") -> None:
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or len(name) > 64:
        raise ValueError("A user name is 1-64 letters, digits, '.', '_' or '-'")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"A password has at least {MIN_PASSWORD} characters")
    if role not in ROLES:
        raise ValueError(f"A role is one of {', '.join(ROLES)}")
    users = read_users(path) if os.path.exists(path) else {}
    users[name] = {"hash": bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode(), "role": role}
    write_private(path, json.dumps({"users": users}, indent=2))


class LoginLocked(Exception):
    """Too many wrong passwords for this user name: retry after ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__(f"Too many failed logins: try again in {int(seconds) + 1} s")
        self.seconds = seconds


class LoginThrottle:
    """Wrong-password backoff per user name (module doc). In memory: a restart forgets it."""

    FREE, FIRST_S, MAX_S, MAX_NAMES = 5, 30.0, 900.0, 10000

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.failures: Dict[str, list] = {}  # name -> [failures in a row, locked until]
        self._lock = threading.Lock()  # logins are checked in parallel (FastAPI's thread pool)

    def check(self, name: str) -> None:
        entry = self.failures.get(name)
        if entry is not None and entry[1] > self.clock():
            raise LoginLocked(entry[1] - self.clock())

    def failed(self, name: str) -> None:
        if name not in self.failures and len(self.failures) >= self.MAX_NAMES:  # bounded memory under a spray
            # the oldest name that is not locked now: a spray of made-up names must not unlock the one being guessed
            now = self.clock()
            unlocked = next((n for n, (_, until) in self.failures.items() if until <= now), None)
            self.failures.pop(unlocked if unlocked is not None else next(iter(self.failures)))
        entry = self.failures.setdefault(name, [0, 0.0])
        entry[0] += 1
        if entry[0] >= self.FREE:
            entry[1] = self.clock() + min(self.MAX_S, self.FIRST_S * 2 ** (entry[0] - self.FREE))

    def succeeded(self, name: str) -> None:
        with self._lock:
            self.failures.pop(name, None)

    def attempt(self, name: str) -> None:
        """Check and count one login attempt as a failure at once, before the password is checked (a correct one
        then calls :meth:`succeeded`): guesses sent in parallel cannot all pass the check before any is counted."""
        with self._lock:
            self.check(name)
            self.failed(name)


class LocalAuth:
    """Users from a file, tokens signed with a key kept next to it.

    Args:
        users_path: the user file (see the module docstring).
        token_hours: how long a token is valid.
    """

    def __init__(self, users_path: str, token_hours: float = 12.0):
        self.users_path = users_path
        self.token_s = int(token_hours * 3600)
        if self.token_s <= 0:
            raise ValueError(f"token_hours must be positive, got {token_hours}")
        if not read_users(users_path):
            raise ValueError(f"The user file {users_path} has no users: add one with `add-user NAME`")
        self._key = self._load_key(f"{users_path}.key")
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt())  # same work for unknown users
        self.throttle = LoginThrottle()

    @staticmethod
    def _load_key(path: str) -> bytes:
        try:
            with open(path) as f:
                key = f.read().strip()
        except FileNotFoundError:
            key = ""
        if len(key) < 64:
            key = secrets.token_hex(32)
            write_private(path, key)
        return bytes.fromhex(key)

    def login(self, username: str, password: str) -> Optional[str]:
        """A signed token for valid credentials, else None; :class:`LoginLocked` while the name is throttled.
        The file is read each time: edits need no restart."""
        self.throttle.attempt(username)  # counted as a failure until the password is found right
        users = read_users(self.users_path)
        entry = users.get(username)
        stored = entry["hash"].encode() if entry else self._dummy
        try:
            ok = bcrypt.checkpw(password.encode(), stored)
        except ValueError:
            ok = False
        if not (ok and entry):
            return None
        self.throttle.succeeded(username)
        now = int(time.time())
        return jwt.encode({"sub": username, "iat": now, "exp": now + self.token_s}, self._key, algorithm=ALGORITHM)

    def role(self, name: str) -> str:
        """``admin`` or ``annotator`` (module doc); the server's own processes are admin."""
        if name == SERVICE:
            return "admin"
        try:
            role = read_users(self.users_path).get(name, {}).get("role")
        except (OSError, ValueError):
            return "annotator"
        return role if role in ROLES else "annotator"

    def users(self) -> Dict[str, Dict]:
        return read_users(self.users_path)

    def service_token(self, days: float = 30.0) -> str:
        """A token for the server's own training and scoring processes, which call it back (after a training,
        monailabel posts ``/scoring/``). It goes to them in their environment only, never over the network."""
        now = int(time.time())
        claims = {"sub": SERVICE, "svc": secrets.token_hex(8), "iat": now, "exp": now + int(days * 86400)}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def user(self, token: str) -> Optional[str]:
        """The user name of a valid, unexpired token whose user still exists, else None."""
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
        except jwt.InvalidTokenError:
            return None
        name = claims.get("sub")
        if name == SERVICE and claims.get("svc"):
            return name
        try:
            return name if name in read_users(self.users_path) else None
        except (OSError, ValueError):
            return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Users of the Med-URWKV MONAI Label server's login")
    parser.add_argument("action", choices=["add-user"])
    parser.add_argument("name")
    parser.add_argument(
        "--users",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "users.json"),
        help="the user file (default: monailabel_app/model/users.json, what the server reads by default)",
    )
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    parser.add_argument("--role", choices=ROLES, default="annotator", help="admin may also delete images and labels")
    args = parser.parse_args(argv)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            print("The passwords differ", file=sys.stderr)
            return 1
    try:
        add_user(args.users, args.name, password, args.role)
    except (ValueError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"User {args.name} ({args.role}) saved in {args.users}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
