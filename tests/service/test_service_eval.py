"""Evaluation in service jobs (``data.eval``) and continued training (``lora.init_from: JOB_ID``).

Real Ray (conftest's session), real HTTP on 127.0.0.1, real SQLite, the real ``ferrytune eval``
entry point. One service for the module.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from service_testlib import add_tenant, free_port, job_spec, lora_config, wait_for, write_classification, write_completion

pytest.importorskip("ray")

from ferrytune.launch.cli import main as ferrytune_main
from ferrytune.service._client import Client, ClientError
from ferrytune.service._controller import ControllerSettings
from ferrytune.service._service import Service, ServiceConfig
from ferrytune.service.cli import main as cli_main

WAIT_S = 180.0
EVAL_CLS_ROWS, EVAL_CMP_ROWS = 37, 23  # not multiples of the eval chunk (4 rows): a short last chunk
# A completion job's eval loss may share a forward with another job's eval (packed: other padding,
# other GEMM shapes); float32 rounding of a 2-layer forward is ~1e-7 relative, so 1e-5 is a wide
# bound that a wrong adapter or wrong rows (differences of 1e-3 and more) cannot meet.
PACKED_LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def svc(ray_session, tiny, tmp_path_factory):
    d, base = tiny
    root = tmp_path_factory.mktemp("eval")
    state = root / "state"
    write_classification(root / "ev-cls.jsonl", EVAL_CLS_ROWS, seed=5)
    write_completion(root / "ev-cmp.jsonl", EVAL_CMP_ROWS, seed=6)
    tokens = {name: add_tenant(state, name) for name in ("alice", "bob")}
    settings = ControllerSettings(worker_memory_gib=1.0, max_workers=1, max_jobs_per_worker=4, token_capacity=512,
                                  checkpoint_every_steps=2, worker_num_cpus=1.0, worker_slice_s=0.3, tick_s=0.05)
    service = Service(ServiceConfig(state_dir=str(state), bases={"tiny": str(base)}, port=free_port(),
                                    controller=settings)).start()
    clients = {name: Client(service.url, tok) for name, tok in tokens.items()}
    yield SimpleNamespace(url=service.url, root=root, data=d, base=base, tokens=tokens, **clients)
    service.stop()




def submit_file(client, path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return client.submit(path)["id"]  # the client uploads data.train and data.eval


def ferrytune_eval(tmp: Path, base, train, eval_file, adapter_dir, torch_threads, **kw) -> dict:
    """``ferrytune eval CONFIG --checkpoint ADAPTER --output FILE`` through the CLI's own entry point."""
    config = lora_config(str(base), str(train), **kw)
    config["data"]["eval"] = str(eval_file)
    config["output_dir"] = str(tmp / "eval-run")
    path = tmp / "eval-config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "eval.json"
    with torch_threads(1):  # the worker's thread count (worker_num_cpus = 1)
        assert ferrytune_main(["eval", str(path), "--checkpoint", str(adapter_dir), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_job_eval_equals_ferrytune_eval_of_its_fetched_adapter(svc, tmp_path, capsys, torch_threads):
    s = svc
    cls_spec = {**job_spec("tiny", str(s.data / "cls.jsonl"), steps=6), "name": "with-eval"}
    cls_spec["data"]["eval"] = str(s.root / "ev-cls.jsonl")
    cls_spec["train"]["eval_every_steps"] = 3
    cmp_spec = job_spec("tiny", str(s.data / "cmp.jsonl"), steps=60, rank=8, targets=("o_proj", "up_proj"))
    cmp_spec["data"]["eval"] = str(s.root / "ev-cmp.jsonl")  # evaluated at step 0 and after step 60 only
    id_cls = submit_file(s.alice, tmp_path / "cls.yaml", cls_spec)
    id_cmp = submit_file(s.bob, tmp_path / "cmp.yaml", cmp_spec)
    job = wait_for(s.alice, id_cls, timeout_s=WAIT_S)
    bob_job = wait_for(s.bob, id_cmp, timeout_s=WAIT_S)

    # the metrics hold one eval row per eval step, with single-job metrics.jsonl's keys
    evals = s.alice.metrics(id_cls)["evals"]
    assert [e["step"] for e in evals] == [0, 3, 6], evals
    assert all(e["eval_samples"] == EVAL_CLS_ROWS and 0 <= e["eval_accuracy"] <= 1 for e in evals)
    assert len(s.alice.metrics(id_cls)["metrics"]) == 6  # training rows as before
    # the status reports the last one
    assert (job["eval_step"], job["eval_accuracy"], job["eval_loss"], job["eval_samples"]) == (
        6, evals[-1]["eval_accuracy"], evals[-1]["eval_loss"], EVAL_CLS_ROWS)
    assert cli_main(["status", id_cls, "--url", s.url, "--token", s.tokens["alice"]]) == 0
    line = capsys.readouterr().out
    assert f"eval_accuracy {job['eval_accuracy']:.4f}" in line and f"eval_loss {job['eval_loss']:.4f}" in line, line

    # the eval of the neighbour (60 steps) ran while the classification job trained: the
    # classification job's evals after step 0 ran alone, neighbour stepping in between
    bob_steps = [m["time"] for m in s.bob.metrics(id_cmp)["metrics"]]
    assert bob_steps[0] < evals[1]["time"] and bob_steps[-1] > evals[-1]["time"], "no neighbour step during the evals"

    # = ferrytune eval of the fetched adapter on the same rows. Alone, the job's eval runs the
    # same chunks (micro_batch_size or batch_size rows, padded to their longest) through the same
    # forward and sums in the same order as `ferrytune eval`: the numbers are equal bit for bit.
    fetched = tmp_path / "fetched-cls"
    s.alice.fetch(id_cls, fetched)
    ref = ferrytune_eval(tmp_path, s.base, s.data / "cls.jsonl", s.root / "ev-cls.jsonl", fetched, torch_threads,
                         steps=6)
    assert ref["samples"] == EVAL_CLS_ROWS
    assert job["eval_accuracy"] == ref["accuracy"] and job["eval_loss"] == ref["loss"], (job, ref)

    # completion rows: accuracy (exact match of every completion token) and loss
    bob_evals = s.bob.metrics(id_cmp)["evals"]
    assert [e["step"] for e in bob_evals] == [0, 60] and bob_job["eval_step"] == 60
    fetched = tmp_path / "fetched-cmp"
    s.bob.fetch(id_cmp, fetched)
    (tmp_path / "b").mkdir()
    ref = ferrytune_eval(tmp_path / "b", s.base, s.data / "cmp.jsonl", s.root / "ev-cmp.jsonl", fetched,
                         torch_threads, steps=60, rank=8, targets=("o_proj", "up_proj"))
    assert bob_job["eval_accuracy"] == ref["accuracy"]
    assert bob_job["eval_loss"] == pytest.approx(ref["loss"], rel=PACKED_LOSS_RTOL, abs=0)
    # and the adapter trained: its eval loss moved from the baseline by far more than the bound
    assert abs(bob_evals[-1]["eval_loss"] - bob_evals[0]["eval_loss"]) > 100 * PACKED_LOSS_RTOL * ref["loss"]


def test_bad_eval_specs_are_one_line_400s(svc):
    s = svc
    files = s.root / "state" / "tenants" / "alice" / "files"
    (files / "broken-eval.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label"\n')
    s.alice.upload(s.data / "cls.jsonl", "train.jsonl")
    good = job_spec("tiny", "train.jsonl")
    cases = [
        ({**good, "data": {**good["data"], "eval": "../../x.jsonl"}}, "data.eval"),
        ({**good, "data": {**good["data"], "eval": "/etc/passwd"}}, "data.eval"),
        ({**good, "data": {**good["data"], "eval": "missing.jsonl"}}, "data.eval: 'missing.jsonl' is not among"),
        ({**good, "data": {**good["data"], "eval": "broken-eval.jsonl"}}, "data.eval: broken-eval.jsonl:2: not valid"),
        ({**good, "train": {**good["train"], "eval_every_steps": 2}}, "train.eval_every_steps: needs data.eval"),
    ]
    for spec, field in cases:
        with pytest.raises(ClientError) as e:
            s.alice.submit_text(json.dumps(spec))
        message = str(e.value)
        assert e.value.status == 400 and f"HTTP 400: {field}" in message and "\n" not in message, message
        assert "/tmp" not in message and str(s.root) not in message, message


def test_init_from_continues_an_own_finished_job(svc, tmp_path, torch_threads):
    from ferrytune.engine._multi_lora import MultiLoraTrainer

    s = svc
    s.alice.upload(s.data / "cls.jsonl", "train.jsonl")
    s.alice.upload(s.root / "ev-cls.jsonl", "ev.jsonl")
    spec = job_spec("tiny", "train.jsonl", steps=4)
    spec["data"]["eval"] = "ev.jsonl"
    parent = s.alice.submit_text(yaml.safe_dump(spec))["id"]
    wait_for(s.alice, parent, timeout_s=WAIT_S)
    child_spec = {**spec, "train": {**spec["train"], "steps": 2, "seed": 3},
                  "lora": {**spec["lora"], "init_from": parent}}
    child = s.alice.submit_text(yaml.safe_dump(child_spec))["id"]
    wait_for(s.alice, child, timeout_s=WAIT_S)

    # the child's eval at step 0 evaluates the weights it starts from: the parent's last, bit for bit
    keys = ("eval_loss", "eval_accuracy", "eval_samples")
    start, end = s.alice.metrics(child)["evals"][0], s.alice.metrics(parent)["evals"][-1]
    assert (start["step"], end["step"]) == (0, 4)
    assert [start[k] for k in keys] == [end[k] for k in keys], (start, end)
    # its first step's loss (computed before the update) is the loss of the parent's final adapter on
    # the child's first batch: the same trainer, alone, from the fetched adapter, gives the same bits
    first_loss = s.alice.metrics(child)["metrics"][0]["loss"]
    s.alice.fetch(parent, tmp_path / "parent")
    config = lora_config(str(s.base), str(s.data / "cls.jsonl"), steps=2, seed=3)
    ref = MultiLoraTrainer(s.base)
    ref.add_job("from-parent", {**config, "lora": {**config["lora"], "init_from": str(tmp_path / "parent")}},
                work_dir=tmp_path / "ref")
    ref.add_job("fresh", config, work_dir=tmp_path / "fresh")
    with torch_threads(1):
        want = ref.step(job_ids=["from-parent"])["from-parent"]["loss"]
        fresh = ref.step(job_ids=["fresh"])["fresh"]["loss"]
    assert first_loss == want, (first_loss, want)
    assert abs(fresh - want) > 1e-4  # the check can tell the parent's weights from a fresh start

    # another tenant's job id is a 404 exactly like an id that does not exist
    other = {**child_spec, "lora": {**child_spec["lora"], "init_from": parent}}
    s.bob.upload(s.data / "cls.jsonl", "train.jsonl")
    s.bob.upload(s.root / "ev-cls.jsonl", "ev.jsonl")
    messages = []
    for tenant, job_id in ((s.bob, parent), (s.bob, "j-0000000000000000")):
        with pytest.raises(ClientError) as e:
            tenant.submit_text(yaml.safe_dump({**other, "lora": {**other["lora"], "init_from": job_id}}))
        assert e.value.status == 404, str(e.value)
        messages.append(str(e.value).replace(job_id, "ID"))
    assert messages[0] == messages[1] and "lora.init_from" in messages[0]

    # a job not (yet) succeeded: 409; a path or a malformed id: 400; another adapter shape: 400
    running = s.alice.submit_text(yaml.safe_dump({**spec, "train": {**spec["train"], "steps": 1000}}))["id"]
    try:
        with pytest.raises(ClientError) as e:
            s.alice.submit_text(yaml.safe_dump({**spec, "lora": {**spec["lora"], "init_from": running}}))
        assert e.value.status == 409 and "succeeded" in str(e.value), str(e.value)
    finally:
        s.alice.cancel(running)
    bad = [
        ({"init_from": "/srv/ft/tenants/bob/jobs/j-0123456789abcdef/adapter"}, "lora.init_from: name one"),
        ({"init_from": "../bob"}, "lora.init_from: name one"),
        ({"init_from": 7}, "lora.init_from: name one"),
        ({"init_from": parent, "rank": 8}, "lora.rank: rank 8"),
        ({"init_from": parent, "alpha": 3.0}, "lora.alpha: scaling"),
        ({"init_from": parent, "target_modules": ["q_proj", "k_proj"]}, "lora.target_modules"),
        ({"init_from": parent, "dropout": 0.1}, "lora.dropout"),
    ]
    for change, field in bad:
        with pytest.raises(ClientError) as e:
            s.alice.submit_text(yaml.safe_dump({**spec, "lora": {**spec["lora"], **change}}))
        message = str(e.value)
        assert e.value.status == 400 and f"HTTP 400: {field}" in message and "\n" not in message, message
        assert "/tmp" not in message, message
