"""Idempotent Prefect setup for the team stack: the `twostage` process work pool and two automations.

Run by `deploy/stack.py up` with the client environment (PREFECT_API_URL set); safe to run again at any time:
the work pool is created only when missing, and each automation is matched by name and updated in place
(created when missing), so the server always holds exactly the definitions below.

Crash detection (Prefect's documented pattern for open-source Prefect, "How to detect and respond to zombie
flows"): a deployment's flow run emits a `prefect.flow-run.heartbeat` event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the workers get 30). The first automation expects another
heartbeat, or a final state, within 90 s of each heartbeat, for each flow run; when none comes it marks the run
Crashed.

Retry once: the second automation reacts to `prefect.flow-run.Crashed` events whose flow run has run once
(`prefect.run-count` label "1", the count of times the run entered Running) and reschedules the run as
Scheduled/"AwaitingRetry", which a worker of the pool picks up. The retry is the run's second Running, so if it
crashes too its Crashed event says run-count "2" and nothing matches: at most one automatic retry, and a run that
crashed before it ever ran (run-count "0") is not retried either, so the policy cannot loop.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

POOL = "twostage"
HEARTBEAT_WITHIN = timedelta(seconds=90)  # three missed heartbeats at PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30

AUTOMATIONS = [
    AutomationCore(
        name="twostage: crash zombie flow runs",
        description="Marks a flow run Crashed when no heartbeat (or final state) follows its last heartbeat "
        "within 90 s: its process or machine died without reporting.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=HEARTBEAT_WITHIN,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat for 90 s: marked Crashed.")],
    ),
    AutomationCore(
        name="twostage: retry a crashed flow run once",
        description="Reschedules a flow run that crashed on its first run (prefect.run-count 1) as "
        "AwaitingRetry, so another worker runs it again; a crash of that retry (run-count 2) is left Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*", "prefect.run-count": "1"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry", message="Crashed on its first run: retried once."
            )
        ],
    ),
]


def main() -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
            print(f"work pool {POOL!r}: exists")
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))
            print(f"work pool {POOL!r}: created (type process)")
        for automation in AUTOMATIONS:
            existing = client.read_automations_by_name(automation.name)
            for extra in existing[1:]:  # a duplicate left by hand: keep exactly one
                client.delete_automation(extra.id)
            if existing:
                client.update_automation(existing[0].id, automation)
                print(f"automation {automation.name!r}: updated")
            else:
                client.create_automation(automation)
                print(f"automation {automation.name!r}: created")


if __name__ == "__main__":
    main()
