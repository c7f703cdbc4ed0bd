"""What the console pages show, read from the index: counts, timelines, jobs, peers' last outcome.

Rows hold UIDs, AE titles, states and times only: the index has no patient name or ID.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from ..notify import job_stages
from ..store.index import AuditEvent, Database, Delivery, Instance, Job, Series, Study, utcnow

#: the timeline of a series, in path order: (label, what it measures)
TIMELINE = (
    ("received", "first to last instance"),
    ("complete", "last instance to series complete"),
    ("queued", "complete to job started"),
    ("model", "load + pipeline"),
    ("encoded", "encode + write results"),
    ("sent", "results encoded to last delivery acknowledged"),
)
JOB_STATES = ("queued", "running", "sending", "done", "failed")


@dataclass
class Stage:
    name: str
    ms: float | None
    #: share of the whole timeline, for the bar width (0-100)
    percent: float = 0.0


@dataclass
class JobRow:
    id: int
    rule: str
    pipeline: str
    state: str
    priority: int
    generation: int
    error: str | None
    attempts: int
    result_count: int
    created_at: dt.datetime | None
    finished_at: dt.datetime | None
    series_uid: str
    timings: str
    deliveries: list[Delivery] = field(default_factory=list)
    result_path: str | None = None

    @property
    def can_retry(self) -> bool:
        return self.state in ("failed", "done")

    @property
    def can_cancel(self) -> bool:
        return self.state == "queued"


@dataclass
class SeriesRow:
    id: int
    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    state: str
    generation: int
    instance_count: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None
    completed_by: str | None
    jobs: list[JobRow] = field(default_factory=list)
    timeline: list[Stage] = field(default_factory=list)


@dataclass
class Dashboard:
    series_total: int
    series_receiving: int
    instances_total: int
    jobs: dict[str, int]
    queue: list[tuple[str, int, int]]  # (pipeline, queued, running)
    recent: list[SeriesRow]


def _ms(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() * 1000 if a and b else None


def timeline(series: Series, job: Job | None) -> list[Stage]:
    """Per-stage milliseconds of a series and (when it has one) its latest job."""
    values: dict[str, float | None] = {
        "received": _ms(series.first_received_at, series.last_received_at),
        "complete": _ms(series.last_received_at, series.completed_at),
        "queued": None, "model": None, "encoded": None, "sent": None,
    }
    if job is not None:
        stages = job_stages(job)
        values["queued"] = _ms(job.series_completed_at, job.started_at)
        if stages.get("model") is not None:
            values["model"] = 1000 * ((stages.get("load") or 0.0) + stages["model"])
        if stages.get("encode") is not None:
            values["encoded"] = 1000 * ((stages.get("encode") or 0.0) + (stages.get("write") or 0.0))
        if job.state == "done" or job.finished_at:
            values["sent"] = _ms(job.encoded_at, job.finished_at)
    total = sum(v for v in values.values() if v) or 1.0
    return [Stage(name, values[name], 100.0 * (values[name] or 0.0) / total) for name, _ in TIMELINE]


def _job_row(job: Job, series_uid: str, deliveries: list[Delivery]) -> JobRow:
    return JobRow(job.id, job.rule, job.pipeline, job.state, job.priority, job.generation, job.error, job.attempts,
                  job.result_count or 0, job.created_at, job.finished_at, series_uid, job.timings or "",
                  deliveries, getattr(job, "result_path", None))


def _series_row(session: Session, series: Series, with_jobs: bool = True) -> SeriesRow:
    study = session.get(Study, series.study_id)
    row = SeriesRow(series.id, series.series_uid, study.study_uid if study else "", series.modality, series.calling_ae,
                    series.state, series.generation, series.instance_count, series.first_received_at,
                    series.last_received_at, series.completed_at, series.completed_by)
    latest = None
    if with_jobs:
        jobs = session.execute(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc())).scalars().all()
        for job in jobs:
            deliveries = session.execute(select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)).scalars().all()
            row.jobs.append(_job_row(job, series.series_uid, list(deliveries)))
        current = [j for j in jobs if j.generation == series.generation]
        latest = current[0] if current else None
    row.timeline = timeline(series, latest)
    return row


def dashboard(db: Database, recent: int = 10) -> Dashboard:
    def read(session: Session) -> Dashboard:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        per_pipeline: dict[str, list[int]] = {}
        for pipeline, state, count in session.execute(
                select(Job.pipeline, Job.state, func.count()).where(Job.state.in_(("queued", "running", "sending")))
                .group_by(Job.pipeline, Job.state)).all():
            slot = per_pipeline.setdefault(pipeline, [0, 0])
            slot[0 if state == "queued" else 1] += count
        queue = sorted((p, q, r) for p, (q, r) in per_pipeline.items())
        series = session.execute(select(Series).order_by(Series.last_received_at.desc()).limit(recent)).scalars().all()
        return Dashboard(
            series_total=session.execute(select(func.count()).select_from(Series)).scalar_one(),
            series_receiving=session.execute(select(func.count()).select_from(Series).where(Series.state == "receiving")).scalar_one(),
            instances_total=session.execute(select(func.count()).select_from(Instance)).scalar_one(),
            jobs={state: int(jobs.get(state, 0)) for state in JOB_STATES},
            queue=queue,
            recent=[_series_row(session, s) for s in series],
        )

    return db.run(read)


def series_detail(db: Database, series_uid: str) -> tuple[SeriesRow, list[Instance], list[AuditEvent]] | None:
    def read(session: Session):  # type: ignore[no-untyped-def]
        series = session.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one_or_none()
        if series is None:
            return None
        row = _series_row(session, series)
        instances = session.execute(select(Instance).where(Instance.series_id == series.id).order_by(Instance.id)
                                    .limit(500)).scalars().all()
        job_ids = [j.id for j in row.jobs]
        events = session.execute(select(AuditEvent).where(or_(AuditEvent.series_uid == series_uid,
                                                              AuditEvent.job_id.in_(job_ids) if job_ids else False))
                                 .order_by(AuditEvent.id).limit(500)).scalars().all()
        return row, list(instances), list(events)

    return db.run(read)


def instance_paths(db: Database, series_uid: str) -> list[str]:
    return db.run(lambda s: list(s.execute(select(Instance.path).join(Series, Series.id == Instance.series_id)
                                           .where(Series.series_uid == series_uid)).scalars()))


def first_instance(db: Database, series_uid: str) -> tuple[str, str] | None:
    """(path of the series' first stored instance, calling AE) — what the router sees at completion."""
    def read(session: Session) -> tuple[str, str] | None:
        row = session.execute(select(Instance.path, Series.calling_ae).join(Series, Series.id == Instance.series_id)
                              .where(Series.series_uid == series_uid).order_by(Instance.id).limit(1)).first()
        return (row[0], row[1] or "") if row else None

    return db.run(read)


def job(db: Database, job_id: int) -> JobRow | None:
    def read(session: Session) -> JobRow | None:
        j = session.get(Job, job_id)
        if j is None:
            return None
        series = session.get(Series, j.series_id)
        deliveries = session.execute(select(Delivery).where(Delivery.job_id == j.id)).scalars().all()
        return _job_row(j, series.series_uid if series else "", list(deliveries))

    return db.run(read)


def jobs(db: Database, state: str | None, limit: int = 200) -> list[JobRow]:
    def read(session: Session) -> list[JobRow]:
        q = select(Job, Series.series_uid).join(Series, Series.id == Job.series_id).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == state)
        rows = session.execute(q).all()
        out = []
        for j, series_uid in rows:
            deliveries = session.execute(select(Delivery).where(Delivery.job_id == j.id).order_by(Delivery.id)).scalars().all()
            out.append(_job_row(j, series_uid, list(deliveries)))
        return out

    return db.run(read)


def cancel(db: Database, job_id: int, user: str) -> str:
    """Cancel a queued job: it ends as failed (retry runs it again); a running job is not stopped."""
    from .. import audit

    def go(session: Session) -> int:
        done = session.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(
            state="failed", error=f"cancelled by {user} in the web console", finished_at=utcnow())).rowcount
        if done == 1:  # with the state change: the job-end watchers read this row
            audit.add(session, "job-cancelled", job_id=job_id, detail=f"by {user}")
        return done

    if db.run(go) != 1:
        state = db.run(lambda s: getattr(s.get(Job, job_id), "state", None))
        if state is None:
            raise LookupError(f"job {job_id} does not exist")
        raise ValueError(f"job {job_id} is {state}; only a queued job can be cancelled")
    return f"job {job_id}: cancelled"


def recent_series(db: Database, limit: int = 50) -> list[tuple[str, str, str, int]]:
    """(series UID, modality, calling AE, instances) of the latest series, for the rules tester."""
    return db.run(lambda s: [tuple(r) for r in s.execute(
        select(Series.series_uid, Series.modality, Series.calling_ae, Series.instance_count)
        .order_by(Series.last_received_at.desc()).limit(limit)).all()])


def last_deliveries(db: Database, peer_names: list[str]) -> dict[str, Delivery]:
    """The latest finished or failing delivery to each peer (as a named destination or as 'sender')."""
    def read(session: Session) -> dict[str, Delivery]:
        out: dict[str, Delivery] = {}
        for name in peer_names:
            d = session.execute(select(Delivery).where(
                or_(Delivery.destination == name, Delivery.destination == f"sender:{name}"),
                Delivery.attempts > 0).order_by(Delivery.id.desc()).limit(1)).scalar_one_or_none()
            if d is not None:
                out[name] = d
        return out

    return db.run(read)
