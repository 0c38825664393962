"""Authenticators for the hub, with user lifecycle events emitted from their hooks."""

import asyncio
import json
import secrets as _random
import time
from pathlib import Path

import bcrypt
import sqlalchemy as sa
from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from nativeauthenticator import NativeAuthenticator
from nativeauthenticator.handlers import LoginHandler as NativeLoginHandler
from nativeauthenticator.orm import UserInfo
from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import Dict, List, Unicode
from traitlets.config import LoggingConfigurable

from ..accounts import personal_refusal
from ..config import Roles
from ..events.delivery import Deliverer
from ..events.outbox import UserEvents, known_users
from .roles import roles_for


class UserEventsMixin(LoggingConfigurable):
    """Emit ``user.created`` / ``user.updated`` / ``user.deleted`` when gpulab sees a change.

    The last state sent for each user is kept beside the outbox, so a hub restart
    (which calls ``add_user`` for every user) emits nothing new.
    """

    events_url = Unicode(help="SQLAlchemy URL of the event outbox.").tag(config=True)
    event_subscribers = List(Dict(), help="[{'name', 'url', 'token'}] receiving user events.").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events = UserEvents(url=self.events_url, parent=self)
        for sub in self.event_subscribers:
            self.events.add_subscriber(sub["name"], sub["url"], sub["token"])
        self._engine = self.events.engine
        self._roles_cfg = Roles(parent=self)
        self.deliverer = Deliverer(self.events)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not inside the hub (e.g. config checks)
        self.deliverer.start()

    def _sync(self, name: str, groups, admin: bool, create_only: bool = False) -> None:
        state = {
            "groups": sorted(groups),
            "roles": roles_for(groups, admin, self._roles_cfg),
            "admin": bool(admin),
        }
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(known_users.c.state).where(known_users.c.name == name)).first()
            if row and (create_only or json.loads(row.state) == state):
                return
            kind = "user.updated" if row else "user.created"
            self.events.emit(kind, name, **state)
            if row:
                conn.execute(known_users.update().where(known_users.c.name == name).values(state=json.dumps(state)))
            else:
                conn.execute(known_users.insert().values(name=name, state=json.dumps(state)))
        self.deliverer.kick()

    async def run_post_auth_hook(self, handler, authentication):
        authentication = await super().run_post_auth_hook(handler, authentication)
        name = authentication["name"]
        user = handler.find_user(name)
        if self.manage_groups and authentication.get("groups") is not None:
            groups = authentication["groups"]
        else:
            groups = [g.name for g in user.groups] if user else []
        admin = authentication.get("admin")
        if admin is None:
            admin = user.admin if user else name in self.admin_users
        self._sync(name, groups, admin)
        return authentication

    def add_user(self, user):
        # also called for every user at hub start, and mid-login before groups are synced:
        # only a user gpulab has never seen is news here
        super().add_user(user)
        self._sync(user.name, [g.name for g in user.groups], user.admin, create_only=True)

    def delete_user(self, user):
        super().delete_user(user)
        with self._engine.begin() as conn:
            conn.execute(known_users.delete().where(known_users.c.name == user.name))
        self.events.emit("user.deleted", user.name)
        self.deliverer.kick()


MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 72  # bcrypt uses the first 72 bytes only: longer ones are refused, not cut
_UNKNOWN_USER_HASH = bcrypt.hashpw(b"unknown user", bcrypt.gensalt())  # same cost for unknown names


def new_password() -> str:
    """A generated password: 12 random bytes, url-safe (16 characters, 96 bits)."""
    return _random.token_urlsafe(12)


class GpulabPasswordAuthenticator(UserEventsMixin, NativeAuthenticator):
    """The embedded default: every user has their own password (bcrypt hashes in the hub's database).

    jupyterhub-nativeauthenticator keeps the hashes and serves the pages (sign-in, change password,
    the admin's change-password and approval pages, sign-up when ``Login.self_signup`` is on); gpulab
    checks passwords off the event loop, says why a sign-in was refused, and adds the admin API
    `gpulab users` calls (:class:`PasswordAPIHandler`). Admins get their first password from
    ``admin_password_file``.
    """

    admin_password_file = Unicode(help="0600 file with the admins' first password, made by gpulab.").tag(config=True)
    owner = Unicode(help="Isolation 'personal': the one user who may sign in (the OS user who started gpulab).").tag(
        config=True
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.admin_password_file:
            password = Path(self.admin_password_file).read_text().strip()
            for name in self.admin_users:
                if self.get_user(name) is None:
                    self.set_password(name, password)

    def set_password(self, name: str, password: str) -> None:
        """Give ``name`` the password ``password`` (approved: an admin set it); ValueError if it is too weak."""
        if not MIN_PASSWORD_LENGTH <= len(password.encode()) <= MAX_PASSWORD_LENGTH:
            raise ValueError(f"must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} bytes long")
        if self.is_password_common(password):
            raise ValueError("is one of the most common passwords: choose another")
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
        info = self.get_user(name)
        if info is None:
            self.db.add(UserInfo(username=name, password=hashed, is_authorized=True))
        else:
            info.password, info.is_authorized = hashed, True
        self.db.commit()
        self.successful_login(name)  # a new password lifts a lockout

    def retry_after(self, name: str) -> int:
        """Seconds until a locked ``name`` may try again."""
        last = self.login_attempts[name]["time"]
        return max(1, int(self.seconds_before_next_try - (time.time() - last.timestamp())))

    async def authenticate(self, handler, data):
        name = self.normalize_username(data.get("username") or "")
        password = data.get("password") or ""

        def refuse(message: str) -> None:
            handler.login_refusal = message

        if not self.validate_username(name):
            return refuse(f"{name!r} is not a valid user name: use lower-case letters, digits, '-' and '_'.")
        if self.owner and name != self.owner:
            return refuse(f"This is {self.owner}'s personal gpulab: only {self.owner} may sign in.")
        if self.allowed_failed_logins and self.is_blocked(name):
            return refuse(f"Too many failed sign-ins as {name}: try again in {self.retry_after(name)} s.")
        info = self.get_user(name)
        hashed = info.password if info is not None else _UNKNOWN_USER_HASH
        ok = len(password.encode()) <= MAX_PASSWORD_LENGTH and await asyncio.to_thread(
            bcrypt.checkpw, password.encode(), hashed
        )
        if ok and info is not None:
            if not info.is_authorized:
                return refuse(f"{name} has signed up, but an admin has not approved the account yet.")
            self.successful_login(name)
            return name
        self.add_login_attempt(name)
        return refuse("Wrong user name or password.")

    def check_allowed(self, username, authentication=None):
        return not self.owner or username == self.owner  # authenticate() admitted only approved users

    def add_user(self, user):
        if self.owner and user.name != self.owner:
            raise ValueError(personal_refusal(self.owner))
        super().add_user(user)

    def get_handlers(self, app):
        handlers = [(path, LoginHandler if path == "/login" else h) for path, h in super().get_handlers(app)]
        return [*handlers, (r"/api/gpulab/users/([^/]+)/password", PasswordAPIHandler)]


class LoginHandler(NativeLoginHandler):
    """nativeauthenticator's sign-in page, saying why a sign-in was refused (and not checking twice)."""

    async def post(self):
        data = {name: self.get_argument(name, strip=False) for name in self.request.arguments}
        user = await self.login_user(data)
        if user:
            self._jupyterhub_user = user
            self.redirect(self.get_next_url(user))
            return
        error = getattr(self, "login_refusal", None) or "Wrong user name or password."
        self.finish(await self._render(login_error=error, username=data.get("username")))


class PasswordAPIHandler(APIHandler):
    """``/hub/api/gpulab/users/<name>/password``: set a user's password (what `gpulab users` calls).

    POST: a new generated password, answered once as ``{"password": ...}``; PUT ``{"password": ...}``:
    that one. The user must exist in the hub; needs ``admin:users``.
    """

    def _user(self, user_name: str):
        if self.find_user(user_name) is None:
            raise web.HTTPError(404, f"no user {user_name!r}: create it first (POST /hub/api/users/{user_name})")
        return user_name

    def _set(self, name: str, password: str) -> None:
        try:
            self.authenticator.set_password(name, password)
        except ValueError as e:
            raise web.HTTPError(400, f"password: {e}") from None

    @needs_scope("admin:users")
    async def post(self, user_name):
        password = new_password()
        self._set(self._user(user_name), password)
        self.set_status(201)
        self.write({"name": user_name, "password": password})

    @needs_scope("admin:users")
    async def put(self, user_name):
        body = self.get_json_body() or {}
        password = body.get("password")
        if not isinstance(password, str):
            raise web.HTTPError(400, "password: required, a string")
        self._set(self._user(user_name), password)
        self.write({"name": user_name})


class GpulabOIDCAuthenticator(UserEventsMixin, GenericOAuthenticator):
    """Sign in with an OpenID Connect provider; its groups become hub groups."""
