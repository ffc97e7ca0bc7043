"""Per-tenant resource limits: service-wide defaults (``ferrytune serve`` flags), per-tenant overrides.

Every limit is enforced where the resource is first asked for, before it costs anything:

* ``max_jobs``            jobs queued or running at once (submission answers 429 past it)
* ``max_running_jobs``    jobs of the tenant admitted to workers at once (the scheduler waits)
* ``max_steps``           ``train.steps`` of one job
* ``max_tokens_per_step`` ``train.batch_size x data.max_length`` of one job
* ``max_dataset_bytes``   one uploaded dataset (the upload stream stops there: 413)
* ``max_disk_bytes``      everything in the tenant's area: datasets, job copies, checkpoints, adapters

Overrides are stored with the tenant in the job store (``ferrytune tenants limits NAME ...``)
and read on every request, so a change takes effect at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from ferrytune.errors import ConfigError

__all__ = ["TenantLimits"]


@dataclass(frozen=True)
class TenantLimits:
    max_jobs: int = 256
    max_running_jobs: int = 4
    max_steps: int = 100_000
    max_tokens_per_step: int = 65_536
    max_dataset_bytes: int = 256 << 20
    max_disk_bytes: int = 10 << 30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be a positive integer (got {value!r})")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_overrides(self, overrides: dict | None) -> TenantLimits:
        """These defaults, with a tenant's stored overrides on top (unknown keys are ignored)."""
        known = {k: v for k, v in (overrides or {}).items() if k in self.names() and v is not None}
        return replace(self, **known) if known else self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
