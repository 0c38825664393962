"""``/api/v1/notifications`` of gpulab-jobs: the caller's notification preferences (:mod:`.notifications`);
scope ``custom:gpulab:jobs``."""

from ...service.errors import APIError
from .handlers import UserHandler
from .models import NotificationPrefs


class NotificationsHandler(UserHandler):
    @property
    def notifier(self):
        return self.settings["notifier"]

    async def get(self):
        self.write_json(await self.store.db.run(self.notifier.get, self.user_name))

    async def put(self):
        prefs = self.parse(NotificationPrefs)
        if refused := self.notifier.check(prefs):
            field, why = refused
            raise APIError(422, f"{field}: {why}", field=field, code="invalid")
        self.write_json(await self.store.db.run(self.notifier.put, self.user_name, prefs))


class FeedHandler(UserHandler):
    """The caller's JupyterLab notifications after ``?after=`` (see :meth:`.Notifier.feed`)."""

    async def get(self):
        after = self.integer("after", None)
        self.write_json(await self.store.db.run(self.settings["notifier"].feed, self.user_name, after))


default_handlers = [("/notifications", NotificationsHandler), ("/notifications/feed", FeedHandler)]
