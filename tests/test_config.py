import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from ferrytune.config import TrainConfig, config_from_dict, load_config
from ferrytune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
method: lora
model:
  path: models/tiny
data:
  train: examples/data/tiny-completion.jsonl
train:
  steps: 10
  batch_size: 4
"""


@pytest.fixture
def cfg_file(tmp_path, monkeypatch):
    """cfg_file(text) -> 'config.yaml' holding ``text`` (cwd is tmp_path, so messages show the bare name)."""
    monkeypatch.chdir(tmp_path)

    def write(text: str = MINIMAL) -> str:
        (tmp_path / "config.yaml").write_text(text)
        return "config.yaml"

    return write


def leaf_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaf_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_minimal_yaml_gets_sensible_defaults(cfg_file):
    cfg = load_config(cfg_file())
    assert cfg.method == "lora" and cfg.model.path == "models/tiny"
    assert cfg.train.micro_batch_size is None and cfg.train.effective_micro_batch_size == 4 and cfg.train.num_micro_batches == 1
    assert (cfg.train.seed, cfg.train.lr, cfg.train.lr_schedule, cfg.train.grad_clip) == (0, 1e-6, "constant", 1.0)
    assert (cfg.data.format, cfg.data.eval, cfg.data.max_length, cfg.data.verbalizer) == ("auto", None, 256, [" terrible", " great"])
    assert (cfg.zo.eps, cfg.zo.num_perturbations, cfg.zo.distribution) == (1e-3, 1, "gaussian")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert (cfg.offload.tier, cfg.offload.nvme_dir, cfg.offload.host_budget_gib, cfg.offload.device_budget_gib) == ("resident", None, 4.0, None)
    assert (cfg.parallel.perturbation, cfg.parallel.data, cfg.output_dir, cfg.device, cfg.resume) == (1, 1, "runs/ferrytune", "cpu", "auto")


def test_overrides_are_yaml_scalars_applied_before_validation(cfg_file):
    cfg = load_config(cfg_file(), ["train.lr=2e-5", "lora.target_modules=[q_proj, k_proj]", "data.eval=null",
                                   "offload.tier=nvme", "offload.nvme_dir=/tmp/blocks", "method=zo", "lora.rank_pattern={'layers\\.0\\.': 4}"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.method == "zo"
    assert cfg.offload.nvme_dir == "/tmp/blocks" and cfg.lora.rank_pattern == {"layers\\.0\\.": 4}
    # no file at all: everything from overrides
    cfg = load_config(None, ["model.path=m", "data.train=t.jsonl", "train.steps=1", "train.batch_size=2"])
    assert cfg.train.steps == 1
    # an override can fix a bad value from the file
    bad = MINIMAL.replace("steps: 10", "steps: -3")
    assert load_config(cfg_file(bad), ["train.steps=5"]).train.steps == 5


@pytest.mark.parametrize("method", ["lora", "zo"])
def test_roundtrip_through_dict_and_yaml(cfg_file, tmp_path, method):
    """to_dict() sets every field (Ray and the service ship configs so): checks must judge values."""
    cfg = load_config(cfg_file(MINIMAL.replace("method: lora", f"method: {method}")),
                      ["lora.target_modules=all-linear", "train.micro_batch_size=2"])
    assert config_from_dict(cfg.to_dict()) == cfg and cfg.model_dump() == cfg.to_dict()
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("name", ["zo_smollm2_rt_polarity", "lora_smollm2_rt_polarity", "zo_nvme"])
def test_example_configs_validate_and_say_how_to_run(name):
    path = REPO / "examples" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# ferrytune train examples/{name}.yaml"
    cfg = load_config(path)
    assert cfg.model.path == "models/SmolLM2-135M-Instruct"
    assert (REPO / cfg.data.train).is_file() and (REPO / cfg.data.eval).is_file()


ERRORS = [
    (MINIMAL + "  lrr: 3\n", [], "config.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (MINIMAL, ["train.lr=-1"], "config.yaml (override train.lr): train.lr: must be > 0 (got -1)"),
    (MINIMAL + "  lr: -1\n", [], "config.yaml: train.lr: must be > 0 (got -1)"),
    (MINIMAL, ["train.eps=1"], "config.yaml (override train.eps): unknown key 'train.eps' (did you mean 'zo.eps'?)"),
    (MINIMAL + "trian: {}\n", [], "config.yaml: unknown key 'trian' (did you mean 'train'?)"),
    (MINIMAL.replace("  path: models/tiny\n", "  dtype: x\n"), [], "config.yaml: unknown key 'model.dtype'"),
    (MINIMAL.replace("  path: models/tiny\n", "  compute_dtype: float32\n"), [], "config.yaml: model.path: required key is missing"),
    (MINIMAL.replace("train:\n  steps: 10\n  batch_size: 4\n", ""), [], "config.yaml: train: required key is missing"),
    (MINIMAL, ["method=sgd"], "config.yaml (override method): method: must be one of 'zo' or 'lora' (got 'sgd')"),
    (MINIMAL, ["train.steps=true"], "config.yaml (override train.steps): train.steps: must be an integer (got True)"),
    (MINIMAL, ["train.steps=2.5"], "config.yaml (override train.steps): train.steps: must be an integer (got 2.5)"),
    (MINIMAL, ["train.micro_batch_size=3"], "config.yaml (override train.micro_batch_size): train.micro_batch_size: must divide train.batch_size (got 3, batch_size 4)"),
    (MINIMAL, ["parallel.data=3"], "config.yaml: train.batch_size: 4 examples cannot be shared evenly by parallel.data=3 ranks"),
    (MINIMAL, ["parallel.data=3", "train.micro_batch_size=2"], "config.yaml (override train.micro_batch_size): train.micro_batch_size: gives 2 micro-batches per step, which parallel.data=3 ranks cannot share evenly"),
    (MINIMAL, ["offload.tier=nvme"], "config.yaml: offload.nvme_dir: required when offload.tier is 'nvme'"),
    (MINIMAL, ["offload.host_budget_gib=0"], "config.yaml (override offload.host_budget_gib): offload.host_budget_gib: must be > 0 (got 0)"),
    (MINIMAL, ["zo.momentum=1.0"], "config.yaml (override zo.momentum): zo.momentum: must be < 1 (got 1.0)"),
    (MINIMAL, ["data.template=no field"], "config.yaml (override data.template): data.template: must contain '{text}'"),
    (MINIMAL, ["data.template='{text} {label}'"], "config.yaml (override data.template): data.template: must be a format string whose only field is {text}"),
    (MINIMAL, ["data.verbalizer=[' good']"], "config.yaml (override data.verbalizer): data.verbalizer: needs at least 2 label words"),
    (MINIMAL, ["data.verbalizer=[' a', 3]"], "config.yaml (override data.verbalizer): data.verbalizer[1]: must be a string (got 3)"),
    (MINIMAL, ["lora.target_modules=[]"], "config.yaml (override lora.target_modules): lora.target_modules: must be a non-empty list of module names or 'all-linear'"),
    (MINIMAL, ["lora.rank_pattern={q_proj: x}"], "config.yaml (override lora.rank_pattern): lora.rank_pattern['q_proj']: must be an integer (got 'x')"),
    (MINIMAL, ["lora.rank_pattern={'(': 4}"], "config.yaml (override lora.rank_pattern): lora.rank_pattern: bad regex '('"),
    (MINIMAL, ["train.warmup_steps=11"], "config.yaml (override train.warmup_steps): train.warmup_steps: must be <= train.steps (got 11, steps 10)"),
    (MINIMAL, ["parallel.backend=nccl"], "config.yaml (override parallel.backend): parallel.backend: 'nccl' needs device: cuda"),
    (MINIMAL, ["train=5"], "config.yaml (override train): train: must be a mapping of keys (a section) (got 5)"),
    (MINIMAL, ["train.lr=.nan"], "config.yaml (override train.lr): train.lr: must be a finite number"),
    (MINIMAL, ["train.lr=0", "train.steps=0"], "config.yaml (override train.steps): train.steps: must be > 0 (got 0) (and 1 more problem)"),
    ("- a\n- b\n", [], "config.yaml: the top level must be a mapping of sections (got list)"),
    ("model:\n  path: [unclosed\n", [], "config.yaml:3: invalid YAML:"),
    (MINIMAL, ["train.lr"], "override 'train.lr': expected section.key=value"),
    (MINIMAL, ["model.path.x=1"], "override 'model.path.x=1': 'model.path' is not a section in config.yaml"),
]


@pytest.mark.parametrize("text,overrides,message", ERRORS)
def test_every_error_is_one_line_naming_file_and_key(cfg_file, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(text), overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"^config file not found: nope/config\.yaml$"):
        load_config("nope/config.yaml")


def test_cuda_without_cuda_names_device(cfg_file, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^config\.yaml \(override device\): device: 'cuda' requested but CUDA is not available"):
        load_config(cfg_file(), ["device=cuda"])
    assert load_config(cfg_file(), ["device=cuda"], check_device=False).device == "cuda"


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^job 7: data: required key is missing"):
        config_from_dict({"model": {"path": "m"}, "train": {"steps": 1, "batch_size": 1}}, source="job 7")


def test_docs_table_lists_every_key():
    doc = (REPO / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)`", doc, flags=re.M))
    assert set(leaf_keys()) <= documented, sorted(set(leaf_keys()) - documented)


def test_data_parallel_defaults_as_torchrun_users_expect(cfg_file):
    from ferrytune.config import resolve_world_size

    # parallel.data=2 with batch 8 and no micro_batch_size: one micro-batch of 4 per rank
    cfg = load_config(cfg_file(), ["parallel.data=2", "train.batch_size=8"])
    assert (cfg.parallel.data, cfg.train.micro_batch_size, cfg.train.num_micro_batches) == (2, 4, 2)
    # no parallel setting: a launch of 2 processes is data parallel over both
    plain = load_config(cfg_file(), ["train.batch_size=8"])
    assert plain.train.micro_batch_size is None and plain.parallel.data == 1
    two = resolve_world_size(plain, 2)
    assert (two.parallel.data, two.parallel.perturbation, two.train.micro_batch_size) == (2, 1, 4)
    assert resolve_world_size(plain, 1) is plain
    # explicit settings are kept (init_mesh then refuses a mismatch with the world size)
    for explicit in (["parallel.data=1"], ["parallel.perturbation=2"]):
        cfg = load_config(cfg_file(), ["train.batch_size=8", *explicit])
        assert resolve_world_size(cfg, 2).parallel == cfg.parallel
    with pytest.raises(ConfigError, match=r"^train.batch_size: 7 examples per step cannot be shared evenly by the 2 processes"):
        resolve_world_size(load_config(cfg_file(), ["train.batch_size=7"]), 2)


def test_accumulation_is_a_lora_option_with_one_line_errors(cfg_file):
    assert load_config(cfg_file(), []).train.accumulation == "micro_major"
    assert load_config(cfg_file(), ["train.accumulation=auto"]).train.accumulation == "auto"
    with pytest.raises(ConfigError, match=r"train.accumulation: 'layer_major' applies to method: lora only") as e:
        load_config(cfg_file(), ["method=zo", "train.accumulation=layer_major"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.accumulation") as e:
        load_config(cfg_file(), ["train.accumulation=layers"])
    assert "\n" not in str(e.value)
