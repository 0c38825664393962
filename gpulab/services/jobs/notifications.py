"""Notifications when a job or pipeline ends: a webhook (JSON, HMAC-signed), e-mail over SMTP and JupyterLab, per
user's preferences.

A user chooses which final states they are told of and where (``PUT /notifications``); when one of their jobs
ends so, an outbox row per channel is written in the same transaction as the job's final state
(:attr:`~.store.JobStore.finished_hooks`), so that nothing ending is lost and nothing is told that did not end. A
pipeline's steps are not told one by one: the pipeline is, in the transaction that ends its last step, with its own
state (:func:`.pipelines.ended`). The :class:`Notifier` (``c.Notifier``) delivers them on its own, at least once,
retried with backoff, never in the way of the queue.

- **Webhook**: ``POST`` of ``{"event": "job.ended", "job": {...}}`` (or ``{"event": "pipeline.ended", "pipeline":
  {...}}``) with ``X-Gpulab-Signature-256: sha256=<HMAC of
  the body>`` under the platform's secret (``c.Notifier.webhook_secret_file``, 0600, made on first start; the
  admin gives it to the receivers), ``X-Gpulab-Delivery`` (the outbox row, the same on a retry). Only URLs the
  admin allows (``c.Notifier.webhook_allowed``, shell patterns; none by default): the service posts from inside
  the platform, so a user's URL could otherwise reach what only the platform can.
- **E-mail**: to the address the user gives, through ``c.Notifier.smtp_host`` (none by default: no e-mail).
- **JupyterLab** (on unless the user turns it off): a row in the user's feed, ``GET /notifications/feed?after=N``,
  which every open Lab of theirs reads and shows as a JupyterLab notification. It is written delivered: many Labs
  (or none) read it, so the feed keeps it for ``c.Notifier.retention_days`` and each Lab remembers where it was.

Delivered rows, and those given up on, are deleted after ``retention_days``.
"""

import asyncio
import fnmatch
import hashlib
import hmac
import json
import smtplib
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from gpulab.secrets import persistent_secret, read_secret_file
from gpulab.service.periodic import periodic
from gpulab.service.storage import utcnow

from . import pipelines
from .models import DEFAULT_NOTIFIED, FeedEntry, NotificationFeed, NotificationPrefs, NotificationSettings
from .store import JobRow, JobStore, NotificationPrefsRow, NotificationRow, iso

MAX_BATCH = 50
MAX_FEED = 50
PRUNE_EVERY = 600.0  # seconds between deletions of rows past Notifier.retention_days


def payload(row: JobRow) -> dict:
    """What a notification says of the job that ended."""
    return {
        "event": "job.ended",
        "job": {
            "id": row.id,
            "name": row.name,
            "owner": row.owner,
            "kind": row.kind,
            "state": row.state,
            "state_reason": row.state_reason,
            "exit_code": row.exit_code,
            "created_at": iso(row.created_at),
            "finished_at": iso(row.finished_at),
            "mlflow_run_id": row.mlflow_run_id,
            "schedule_id": row.schedule_id,
            "output_notebook": row.output_notebook,
        },
    }


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Notifier(LoggingConfigurable):
    """Tells users their jobs ended (their preferences in ``notification_prefs``, the outbox in ``notifications``)."""

    webhook_allowed = List(
        Unicode(),
        help="Shell patterns of the webhook URLs users may give, e.g. ['https://hooks.example.com/*']; none by "
        "default (the service posts from inside the platform).",
    ).tag(config=True)
    webhook_secret_file = Unicode(
        help="0600 file with the HMAC secret webhooks are signed with (default <data dir>/jobs/.webhook-secret, "
        "made on first start).",
    ).tag(config=True)
    smtp_host = Unicode("", help="SMTP server for e-mail notifications; empty: no e-mail.").tag(config=True)
    smtp_port = Integer(25, help="Its port.").tag(config=True)
    smtp_from = Unicode("gpulab@localhost", help="The sender of notification e-mails.").tag(config=True)
    interval = Float(1.0, min=0.05, help="Seconds between delivery passes.").tag(config=True)
    timeout = Float(10.0, min=0.1, help="Seconds a delivery may take.").tag(config=True)
    max_attempts = Integer(8, min=1, help="Deliveries tried before one is given up on.").tag(config=True)
    backoff = Float(2.0, min=0.01, help="Seconds before the first retry; doubled each time, at most 300.").tag(
        config=True
    )
    retention_days = Float(
        7.0, min=0.0, help="Days the JupyterLab feed keeps a notification, and delivered ones are kept."
    ).tag(config=True)

    def __init__(self, store: JobStore, data_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.store = store
        self.default_secret_file = Path(data_dir) / "jobs" / ".webhook-secret"
        self._secret: str | None = None
        self._pruned_at = float("-inf")
        if self.webhook_allowed:  # webhooks are possible: a bad secret file stops the start, not a delivery
            self._secret = self._read_secret()
        store.finished_hooks.append(self.enqueue)

    def _read_secret(self) -> str:
        if self.webhook_secret_file:
            return read_secret_file(self.webhook_secret_file, "Notifier.webhook_secret_file").reveal()
        return persistent_secret(self.default_secret_file)

    @property
    def secret(self) -> str:
        """The webhooks' HMAC secret (read, or made, when the service starts where webhooks are allowed)."""
        if self._secret is None:
            self._secret = self._read_secret()
        return self._secret

    def allowed(self, url: str) -> bool:
        return any(fnmatch.fnmatchcase(url, pattern) for pattern in self.webhook_allowed)

    # -- preferences

    def check(self, prefs: NotificationPrefs) -> tuple[str, str] | None:
        """(field, why) when ``prefs`` asks for what this platform does not do."""
        if prefs.webhook_url and not self.allowed(prefs.webhook_url):
            allowed = ", ".join(self.webhook_allowed) or "none"
            return (
                "webhook_url",
                f"this platform posts only to the URLs its admin allows (Notifier.webhook_allowed: {allowed})",
            )
        if prefs.email and not self.smtp_host:
            return "email", "this platform sends no e-mail (Notifier.smtp_host is not set)"
        return None

    def get(self, owner: str) -> NotificationSettings:
        undelivered = select(func.count()).where(NotificationRow.owner == owner, NotificationRow.delivered_at.is_(None))
        with self.store.session() as session:
            row = session.get(NotificationPrefsRow, owner)
            pending = session.scalar(undelivered.where(NotificationRow.attempts < self.max_attempts))
            failed = session.scalar(undelivered.where(NotificationRow.attempts >= self.max_attempts))
        return NotificationSettings(
            states=row.states if row else DEFAULT_NOTIFIED,
            lab=row.lab if row else True,
            webhook_url=row.webhook_url if row else None,
            email=row.email if row else None,
            pending=pending,
            failed=failed,
        )

    def put(self, owner: str, prefs: NotificationPrefs) -> NotificationSettings:
        with self.store.session() as session, session.begin():
            row = session.get(NotificationPrefsRow, owner) or NotificationPrefsRow(owner=owner)
            row.states, row.lab = [str(s) for s in prefs.states], prefs.lab
            row.webhook_url, row.email = prefs.webhook_url, prefs.email
            row.updated_at = utcnow()
            session.add(row)
        return self.get(owner)

    # -- the outbox

    def enqueue(self, session: Session, row: JobRow) -> None:
        """In the transaction that ends ``row``: a notification per channel its owner asked for, of the job, or of
        its pipeline when it was the pipeline's last step to end."""
        if row.pipeline_id:
            if (pipeline := pipelines.ended(session, row.pipeline_id)) is None:
                return
            body, state = {"event": "pipeline.ended", "pipeline": pipeline.model_dump(mode="json")}, pipeline.state
        else:
            body, state = payload(row), row.state
        prefs = session.get(NotificationPrefsRow, row.owner) or NotificationPrefsRow(
            states=[str(s) for s in DEFAULT_NOTIFIED], lab=True
        )
        if state not in prefs.states:
            return
        now = utcnow()
        channels = [(c, target) for c, target in (("webhook", prefs.webhook_url), ("email", prefs.email)) if target]
        if prefs.lab:
            channels.append(("lab", ""))
        for channel, target in channels:
            session.add(
                NotificationRow(
                    owner=row.owner,
                    job_id=row.id,
                    channel=channel,
                    target=target,
                    payload=body,
                    attempts=0,
                    next_attempt_at=now,
                    delivered_at=now if channel == "lab" else None,  # read from the feed, not sent
                    created_at=now,
                )
            )

    def feed(self, owner: str, after: int | None) -> NotificationFeed:
        """``owner``'s JupyterLab notifications newer than ``after`` (oldest first); without ``after``, none and
        the cursor of the newest, so that a Lab opened now starts from now."""
        mine = (NotificationRow.owner == owner, NotificationRow.channel == "lab")
        with self.store.session() as session:
            if after is None:
                newest = session.scalar(select(func.max(NotificationRow.id)).where(*mine))
                return NotificationFeed(notifications=[], cursor=newest or 0)
            rows = session.scalars(
                select(NotificationRow)
                .where(*mine, NotificationRow.id > after)
                .order_by(NotificationRow.id)
                .limit(MAX_FEED)
            ).all()
        entries = [
            FeedEntry(
                id=r.id, created_at=iso(r.created_at), job=r.payload.get("job"), pipeline=r.payload.get("pipeline")
            )
            for r in rows
        ]
        return NotificationFeed(notifications=entries, cursor=rows[-1].id if rows else after)

    def prune(self, now: datetime) -> int:
        """Delete the rows past ``retention_days`` that are delivered or given up on; how many."""
        with self.store.session() as session, session.begin():
            done = or_(NotificationRow.delivered_at.is_not(None), NotificationRow.attempts >= self.max_attempts)
            old = NotificationRow.created_at < now - timedelta(days=self.retention_days)
            return session.execute(delete(NotificationRow).where(old, done)).rowcount

    def due(self, now: datetime) -> list[NotificationRow]:
        query = (
            select(NotificationRow)
            .where(
                NotificationRow.delivered_at.is_(None),
                NotificationRow.attempts < self.max_attempts,
                NotificationRow.next_attempt_at <= now,
            )
            .order_by(NotificationRow.id)
            .limit(MAX_BATCH)
        )
        with self.store.session() as session:
            return list(session.scalars(query))

    def settle(self, row_id: int, error: str | None) -> None:
        with self.store.session() as session, session.begin():
            row = session.get(NotificationRow, row_id)
            row.attempts += 1
            if error is None:
                row.delivered_at = utcnow()
            else:
                row.last_error = error[:1000]
                delay = min(self.backoff * 2 ** (row.attempts - 1), 300.0)
                row.next_attempt_at = utcnow() + timedelta(seconds=delay)

    async def deliver(self, row: NotificationRow) -> str | None:
        """Send one notification; None when it was delivered, else why not."""
        try:
            if row.channel == "webhook":
                if not self.allowed(row.target):
                    return f"{row.target} is no longer allowed (Notifier.webhook_allowed)"
                body = json.dumps(row.payload).encode()
                headers = {
                    "Content-Type": "application/json",
                    "X-Gpulab-Event": row.payload["event"],
                    "X-Gpulab-Delivery": str(row.id),
                    "X-Gpulab-Signature-256": signature(self.secret, body),
                }
                request = HTTPRequest(
                    row.target, "POST", headers, body, request_timeout=self.timeout, follow_redirects=False
                )
                await AsyncHTTPClient().fetch(request)
            else:
                await asyncio.to_thread(self._send_mail, row)
        except HTTPClientError as e:
            return f"HTTP {e.code} from {row.target}"
        except (OSError, smtplib.SMTPException) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _send_mail(self, row: NotificationRow) -> None:
        message = EmailMessage()
        message["From"], message["To"] = self.smtp_from, row.target
        if pipeline := row.payload.get("pipeline"):
            message["Subject"] = f"gpulab: pipeline {pipeline['name']} {pipeline['state']}"
            steps = "".join(f"  {s['name']}: {s['state']} ({s['state_reason']})\n" for s in pipeline["steps"])
            text = f"Your pipeline {pipeline['name']} ({pipeline['id']}) {pipeline['state']} at {pipeline['finished_at']}:\n"
            message.set_content(text + steps)
        else:
            job = row.payload["job"]
            message["Subject"] = f"gpulab: job {job['name']} {job['state']}"
            message.set_content(
                f"Your job {job['name']} ({job['id']}) {job['state']} at {job['finished_at']}: {job['state_reason']}\n"
            )
        with smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout) as smtp:
            smtp.send_message(message)

    async def _one(self, row: NotificationRow) -> None:
        try:
            error = await self.deliver(row)
        except Exception as e:  # counted as a failed attempt, so that one notification cannot stall the rest
            self.log.exception("notification %d could not be delivered", row.id)
            error = f"{type(e).__name__}: {e}"
        if error:
            self.log.warning("notification %d to %s: %s", row.id, row.owner, error)
        await self.store.db.run(self.settle, row.id, error)

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver what is due every ``interval`` seconds until ``stopping``."""
        await periodic(self._pass, self.interval, self.log, "delivering notifications", stopping=stopping)

    async def _pass(self) -> None:
        await asyncio.gather(*(self._one(row) for row in await self.store.db.run(self.due, utcnow())))
        now = asyncio.get_running_loop().time()
        if now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            if pruned := await self.store.db.run(self.prune, utcnow()):
                self.log.info("deleted %d notifications older than %g days", pruned, self.retention_days)
