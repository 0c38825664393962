"""Authenticators for the hub, with user lifecycle events emitted from their hooks."""

import asyncio
import json

import sqlalchemy as sa
from jupyterhub.authenticators.shared import SharedPasswordAuthenticator
from oauthenticator.generic import GenericOAuthenticator
from traitlets import Dict, List, Unicode
from traitlets.config import LoggingConfigurable

from ..config import Roles
from ..events import make_engine
from ..events.delivery import Deliverer
from ..events.outbox import UserEvents
from .roles import roles_for

_metadata = sa.MetaData()
known_users = sa.Table(
    "known_users",
    _metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
)


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
        self._engine = make_engine(self.events_url)
        _metadata.create_all(self._engine)
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


class GpulabPasswordAuthenticator(UserEventsMixin, SharedPasswordAuthenticator):
    """The embedded default: a generated admin password and a shared user password."""


class GpulabOIDCAuthenticator(UserEventsMixin, GenericOAuthenticator):
    """Sign in with an OpenID Connect provider; its groups become hub groups."""
