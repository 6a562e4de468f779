"""Verdicts by model and sender: is a site's share of ABNORMAL verdicts moving?

A model's threshold is calibrated at a false-positive rate (5 % by default) on the normals it was trained
beside. A site whose images differ from those (another device, protocol or post-processing) can see far
more false positives: on the Kermany test split, whose normals differ from the train split's, the
bundled chest model flags 18 % of the normals at its 5 % threshold (specificity 0.821,
``benchmarks/results/SUMMARY.md``). Nothing in a single result shows that; the share of ABNORMAL verdicts per model and
sender over time does. A change in that share is the signal (a steady share also reflects the site's
prevalence, which the service cannot know). ``medgru calibrate`` re-sets a threshold on a site's normals.

The sender of a result is the calling AE title that sent its series' latest instance (the key of
``settings.routes``). Only the latest result of a job counts (a re-run replaces it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, and_, case, func, select
from sqlalchemy.orm import Session, aliased

from storage.models import Instance, Job, Result, SequenceRecord, Series

#: how many of the latest results of each model and sender the "recent" share is taken over
DEFAULT_RECENT = 100


@dataclass(frozen=True)
class VerdictRow:
    model: str
    version: str
    sender: str  # calling AE title; "" when unknown
    results: int
    abnormal: int
    recent: int  # the latest min(results, recent) results...
    recent_abnormal: int  # ...and how many of them were ABNORMAL
    last_at: datetime | None

    @property
    def share(self) -> float:
        return self.abnormal / self.results if self.results else 0.0

    @property
    def recent_share(self) -> float:
        return self.recent_abnormal / self.recent if self.recent else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_at"] = self.last_at.isoformat() if self.last_at else None
        d["share"], d["recent_share"] = round(self.share, 4), round(self.recent_share, 4)
        return d


def _latest_results():
    """The latest result of each job, as a subquery: result id, model, version, verdict, time, series id."""
    newer = aliased(Result)
    has_newer = select(newer.id).where(newer.job_fk == Result.job_fk, newer.id > Result.id).exists()
    sender = (select(Instance.calling_ae).where(Instance.series_fk == SequenceRecord.series_fk)
              .order_by(Instance.received_at.desc(), Instance.id.desc()).limit(1).scalar_subquery())
    return (select(Result.id.label("id"), Result.model_name.label("model"), Result.model_version.label("version"),
                   Result.is_anomaly.label("abnormal"), Result.created_at.label("at"),
                   func.coalesce(sender, "").label("sender"))
            .join(Job, Job.id == Result.job_fk)
            .join(SequenceRecord, SequenceRecord.id == Job.sequence_fk)
            .where(~has_newer)
            .subquery())


def verdict_rows(session: Session, *, recent: int = DEFAULT_RECENT) -> list[VerdictRow]:
    """Per model, version and sender (in that order): results, ABNORMAL verdicts, the same over the latest
    ``recent`` results, and the time of the last one."""
    if recent < 1:
        raise ValueError(f"recent must be at least 1, not {recent}")
    latest = _latest_results()
    key = (latest.c.model, latest.c.version, latest.c.sender)
    rank = func.row_number().over(partition_by=key, order_by=(latest.c.at.desc(), latest.c.id.desc()))
    ranked = select(*key, latest.c.abnormal, latest.c.at, rank.label("rank")).subquery()
    abnormal = func.sum(case((ranked.c.abnormal, 1), else_=0)).cast(Integer)
    in_recent = ranked.c.rank <= recent
    rows = session.execute(
        select(ranked.c.model, ranked.c.version, ranked.c.sender, func.count(), abnormal,
               func.sum(case((in_recent, 1), else_=0)).cast(Integer),
               func.sum(case((and_(in_recent, ranked.c.abnormal), 1), else_=0)).cast(Integer),
               func.max(ranked.c.at))
        .group_by(ranked.c.model, ranked.c.version, ranked.c.sender)
    ).all()
    out = [VerdictRow(m, v, s, int(n), int(a or 0), int(rn or 0), int(ra or 0), last)
           for m, v, s, n, a, rn, ra, last in rows]
    return sorted(out, key=lambda r: (r.model, r.version, r.sender))
