"""Leases: a live worker renews its claim while it works; a renewal never takes back a row given away."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import Instance, utcnow
from retinagate.settings import Settings
from worker.lease import HANDOFF, Renewal, handoff_owner, held_by_another, owner, renewing


def test_the_owner_names_the_host_and_this_process() -> None:
    import os
    import socket

    assert owner() == f"{socket.gethostname()}:{os.getpid()}"


def test_renewal_pushes_forward_only_the_leases_this_process_still_holds(
    make_settings: Callable[..., Settings], worker_store_instance: Callable[..., int]
) -> None:
    settings = make_settings()
    upgrade(settings)
    mine, given_away = (worker_store_instance(settings, study=s, status="scoring") for s in range(2))
    engine = make_engine(settings)
    sessions = session_factory(engine)
    soon = utcnow() + timedelta(seconds=5)
    try:
        with session_scope(sessions) as s:
            for instance, holder in ((mine, "me:1"), (given_away, "someone-else:2")):
                row = s.get_one(Instance, instance)
                row.lease_owner, row.lease_expires_at = holder, soon

        assert Renewal(sessions, Instance, [mine, given_away], 60, holder="me:1").renew() == 1

        with session_scope(sessions) as s:
            leases = {i: expires for i, expires in s.execute(select(Instance.id, Instance.lease_expires_at))}
        assert leases[mine] is not None and leases[mine] > soon + timedelta(seconds=50)
        assert leases[given_away] == soon
    finally:
        engine.dispose()


def test_the_renewal_thread_renews_while_the_work_runs_and_stops_with_it(
    make_settings: Callable[..., Settings], worker_store_instance: Callable[..., int]
) -> None:
    settings = make_settings()
    upgrade(settings)
    instance = worker_store_instance(settings, status="scoring")
    engine = make_engine(settings)
    sessions = session_factory(engine)
    try:
        with session_scope(sessions) as s:
            row = s.get_one(Instance, instance)
            row.lease_owner, row.lease_expires_at = owner(), utcnow()
        with renewing(sessions, Instance, [instance], lease_seconds=0.3) as renewal:
            time.sleep(0.5)  # a renewal every 0.1 s
        count = renewal.renewals
        assert count >= 2
        with session_scope(sessions) as s:
            expires = s.get_one(Instance, instance).lease_expires_at
        assert expires is not None and expires > utcnow()
        time.sleep(0.3)
        assert renewal.renewals == count  # stopped with the block
    finally:
        engine.dispose()


def test_a_hand_off_lease_holds_off_the_sweeper_but_no_worker() -> None:
    now = utcnow()
    live, dead = now + timedelta(seconds=30), now - timedelta(seconds=1)

    assert handoff_owner("scorer:1") == f"{HANDOFF}scorer:1"
    assert not held_by_another(handoff_owner("scorer:1"), live, "sender:2", now)
    assert held_by_another("sender:3", live, "sender:2", now)
    assert not held_by_another("sender:3", dead, "sender:2", now)
    assert not held_by_another("sender:2", live, "sender:2", now)
    assert not held_by_another(None, None, "sender:2", now)
