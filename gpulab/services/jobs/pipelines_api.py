"""``/api/v1/pipelines...`` of gpulab-jobs: submit a pipeline (every step at once, or none), list, read and cancel
pipelines (:mod:`.pipelines`), each its owner's (or an admin's); scope ``custom:gpulab:jobs``, as jobs."""

from ...job_states import UNFINISHED_STATES
from .handlers import UserHandler, submission_limits
from .metrics import SUBMITTED
from .models import PipelineList, PipelineSpec
from .pipelines import MAX_LIST, PipelineStore


def count_submitted(spec: PipelineSpec) -> None:
    """The submissions metric, a job per step."""
    for step in spec.steps:
        SUBMITTED.labels(step.job.resources.pool).inc()


class PipelineHandlerBase(UserHandler):
    @property
    def pipelines(self) -> PipelineStore:
        return self.settings["scheduler"].pipelines

    async def pipeline(self, pipeline_id: str):
        return await self.owned(self.pipelines.get, pipeline_id, "pipeline")

    async def write_pipeline(self, row, status: int = 200) -> None:
        (model,) = await self.store.db.run(self.pipelines.models, [row])
        self.write_json(model, status)


class PipelinesHandler(PipelineHandlerBase):
    async def post(self):
        spec = self.parse(PipelineSpec)
        for i, step in enumerate(spec.steps):
            self.check_job(step.job, f"steps.{i}.job.")
        with submission_limits():
            self.queue.limit_submissions(self.user_name)
            row, created = await self.store.db.run(
                self.pipelines.create,
                self.user_name,
                self.current_user.get("groups") or [],
                self.is_admin,
                spec,
                self.queue.max_queued,
            )
        if created:
            count_submitted(spec)
            self.queue.kick()
        await self.write_pipeline(row, 201 if created else 200)

    async def get(self):
        owner = None if (self.flag("all") and self.is_admin) else self.user_name
        limit = self.integer("limit", 50, MAX_LIST)
        schedule = self.object_id("schedule")

        def listed():
            return self.pipelines.models(self.pipelines.listed(owner, schedule, limit))

        self.write_json(PipelineList(pipelines=await self.store.db.run(listed)))


class PipelineHandler(PipelineHandlerBase):
    async def get(self, pipeline_id):
        await self.write_pipeline(await self.pipeline(pipeline_id))


class PipelineCancelHandler(PipelineHandlerBase):
    """Cancel every step that has not ended (running ones are stopped as a job's cancel stops them); waits."""

    async def post(self, pipeline_id):
        row = await self.pipeline(pipeline_id)
        (model,) = await self.store.db.run(self.pipelines.models, [row])
        unfinished = [step.job_id for step in model.steps if step.state in UNFINISHED_STATES]
        await self.queue.cancel_each(unfinished[::-1], f"cancelled by {self.user_name}")
        await self.write_pipeline(row)


PIPELINE = r"/pipelines/(?P<pipeline_id>[0-9a-f]{32})"
default_handlers = [
    ("/pipelines", PipelinesHandler),
    (PIPELINE, PipelineHandler),
    (PIPELINE + "/cancel", PipelineCancelHandler),
]
