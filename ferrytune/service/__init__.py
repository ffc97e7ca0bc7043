"""Multi-tenant LoRA service: jobs on shared base models train packed on Ray workers.

Pieces (one concern each):

* ``_policy``     pure scheduling policies: snapshot -> decisions (admission, fair share,
                  preemption, dead workers) and first-fit-decreasing microbatch packing
* ``_states``     the job state machine (queued, running, succeeded, failed, cancelled)
* ``_controller`` executes decisions on Ray, the only writer of job states
* ``_worker``     the Ray actor: one base model, jobs join and leave between steps
* ``_store``      tenants (hashed tokens), jobs, events, metrics in SQLite / PostgreSQL
* ``_spec``       job specs validated where they enter; ``_paths``: tenant areas
* ``_api``        the HTTP API under ``/v1/``; ``_client``: its Python client
* ``cli``         ``ferrytune serve | tenants | submit | jobs | status | cancel | fetch``

See docs/service.md. Importing this package imports neither Ray nor FastAPI.
"""

from ferrytune.service._policy import pack_microbatches, schedule
from ferrytune.service._states import JobState

__all__ = ["Client", "ControllerSettings", "JobState", "Service", "ServiceConfig", "pack_microbatches", "schedule"]


def __getattr__(name: str):
    # Lazy: the service, its controller (Ray) and the client (requests) load on first use.
    if name in ("Service", "ServiceConfig"):
        from ferrytune.service import _service

        return getattr(_service, name)
    if name == "ControllerSettings":
        from ferrytune.service._controller import ControllerSettings

        return ControllerSettings
    if name == "Client":
        from ferrytune.service._client import Client

        return Client
    raise AttributeError(f"module 'ferrytune.service' has no attribute {name!r}")
