"""``/api/v1/schedules...`` of gpulab-jobs: make, list, change, pause/resume, run now and delete schedules
(:mod:`.schedules`), each its owner's (or an admin's); scope ``custom:gpulab:jobs``, as jobs."""

from ...service.errors import APIError
from ...service.storage import utcnow
from .handlers import UserHandler, submission_limits
from .metrics import SUBMITTED
from .models import PipelineSpec, ScheduleList, ScheduleSpec, ScheduleUpdate
from .pipelines_api import count_submitted
from .schedules import ScheduleNotFound, TooManySchedules, schedule_model
from .store import PipelineRow


class ScheduleHandlerBase(UserHandler):
    @property
    def scheduler(self):
        return self.settings["scheduler"]

    async def schedule(self, schedule_id: str):
        return await self.owned(self.scheduler.schedules.get, schedule_id, "schedule")


class SchedulesHandler(ScheduleHandlerBase):
    async def post(self):
        spec = self.parse(ScheduleSpec)
        if spec.job:
            self.check_job(spec.job, "job.")
        for i, step in enumerate(spec.pipeline.steps if spec.pipeline else []):
            self.check_job(step.job, f"pipeline.steps.{i}.job.")
        groups = self.current_user.get("groups") or []
        try:
            row = await self.store.db.run(
                self.scheduler.schedules.create,
                self.user_name,
                groups,
                self.is_admin,
                spec,
                self.scheduler.max_per_user,
            )
        except TooManySchedules as e:
            raise APIError(409, str(e), code="too_many") from None
        self.write_json(schedule_model(row), 201)

    async def get(self):
        owner = None if (self.flag("all") and self.is_admin) else self.user_name
        rows = await self.store.db.run(self.scheduler.schedules.owned_by, owner)
        self.write_json(ScheduleList(schedules=[schedule_model(r) for r in rows]))


class ScheduleHandler(ScheduleHandlerBase):
    async def get(self, schedule_id):
        self.write_json(schedule_model(await self.schedule(schedule_id)))

    async def patch(self, schedule_id):
        await self.schedule(schedule_id)
        change = self.parse(ScheduleUpdate)
        try:
            row = await self.store.db.run(self.scheduler.schedules.update, schedule_id, change)
        except ScheduleNotFound:
            raise APIError(404, f"no schedule {schedule_id}", field="id", code="not_found") from None
        self.write_json(schedule_model(row))

    async def delete(self, schedule_id):
        await self.schedule(schedule_id)
        try:
            await self.store.db.run(self.scheduler.schedules.delete, schedule_id)
        except ScheduleNotFound:
            pass  # deleted meanwhile: gone either way
        self.set_status(204)
        self.finish()


class RunNowHandler(ScheduleHandlerBase):
    """A run now, whatever its times and ``max_concurrent`` say (as a job, or pipeline, of the schedule's owner)."""

    async def post(self, schedule_id):
        row = await self.schedule(schedule_id)

        def run_now():
            run = self.scheduler.start_run(row, utcnow(), by_hand=True)
            self.scheduler.schedules.ran(row.id, run)
            return run, self.scheduler.pipelines.models([run]) if isinstance(run, PipelineRow) else None

        with submission_limits():
            run, pipeline = await self.store.db.run(run_now)
        self.queue.kick()
        if pipeline:
            count_submitted(PipelineSpec.model_validate(row.pipeline))
            self.write_json(pipeline[0], 201)
        else:
            SUBMITTED.labels(run.pool).inc()
            self.write_json(self.queue.job_model(run), 201)


SCHEDULE = r"/schedules/(?P<schedule_id>[0-9a-f]{32})"
default_handlers = [
    ("/schedules", SchedulesHandler),
    (SCHEDULE, ScheduleHandler),
    (SCHEDULE + "/run", RunNowHandler),
]
