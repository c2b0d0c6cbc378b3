"""retinagate.studies: a study is complete once it has been quiet for the configured period."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from retinagate.db import make_engine, session_factory, upgrade
from retinagate.models import Study, utcnow
from retinagate.settings import Settings
from retinagate.studies import completed_studies, completed_studies_query


def test_only_studies_quiet_for_the_period_count_as_complete(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    upgrade(settings)
    engine = make_engine(settings)
    now = utcnow()
    with session_factory(engine)() as session, session.begin():
        for uid, age in (("1.2.3.1", 3600), ("1.2.3.2", 301), ("1.2.3.3", 10)):
            when = now - timedelta(seconds=age)
            session.add(Study(study_uid=uid, first_received_at=when, last_received_at=when))

    with session_factory(engine)() as session:
        done = completed_studies(session, settings.study_quiet_seconds, now=now)
        assert [s.study_uid for s in done] == ["1.2.3.1", "1.2.3.2"]
        assert completed_studies(session, 0, now=now)[-1].study_uid == "1.2.3.3"
        # The query is plain SQL that callers can extend, here with a count.
        assert session.scalar(completed_studies_query(7200, now).with_only_columns(Study.id).limit(1)) is None
    engine.dispose()


def test_each_stored_instance_restarts_its_study_quiet_period(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.5.1", ["1.2.840.10008.1.2.4.50"])
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title="RETINAGATE")
    first, second = camera_files(2)
    assert assoc.send_c_store(first).Status == 0
    time.sleep(0.3)
    assert assoc.send_c_store(second).Status == 0
    assoc.release()

    engine = make_engine(gateway.settings)
    with session_factory(engine)() as session:
        study = session.query(Study).one()
        started, last = study.first_received_at, study.last_received_at
        assert last - started >= timedelta(seconds=0.3)
        # Quiet for 1 s counted from the first instance is not enough: the second one came later.
        assert completed_studies(session, 1, now=started + timedelta(seconds=1.1)) == []
        assert completed_studies(session, 1, now=last + timedelta(seconds=1)) == [study]
    engine.dispose()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="quiet_seconds"):
        completed_studies_query(-1)
    with pytest.raises(ValueError, match="timezone"):
        completed_studies_query(5, utcnow().replace(tzinfo=None))
