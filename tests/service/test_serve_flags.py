"""``ferrytune serve`` checks its own flags before it starts anything: one line naming the flag."""

from __future__ import annotations

import pytest

from ferrytune.launch import main


@pytest.mark.parametrize("flags,named", [
    (["--base-tier", "nvme"], "--base-nvme-dir is required"),
    (["--base-tier", "host", "--base-host-budget-gib", "-1"], "--base-host-budget-gib: must be > 0"),
    (["--base-tier", "host", "--base-host-budget-gib", "0"], "--base-host-budget-gib: must be > 0"),
    (["--max-workers", "-1"], "--max-workers: must be >= 0"),
    (["--max-jobs-per-worker", "0"], "--max-jobs-per-worker: must be >= 1"),
    (["--token-capacity", "0"], "--token-capacity: must be >= 1"),
    (["--worker-memory-gib", "0"], "--worker-memory-gib: must be > 0"),
    (["--max-steps", "-5"], "--max-steps: must be >= 0"),
    (["--eval-slice-s", "-0.1"], "--eval-slice-s: must be >= 0"),
])
def test_a_bad_serve_flag_is_one_line_before_anything_starts(tmp_path, capsys, flags, named):
    state = tmp_path / "state"
    code = main(["serve", "--state-dir", str(state), "--base", f"tiny={tmp_path / 'no-model'}", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and named in err[-1], err
    assert not state.exists()  # no state dir, no job store, no Ray
