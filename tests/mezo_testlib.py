"""What the plain MeZO loops of the engine and model tests share: the resident model and data of a
config, the step's batch, and the loss as the engine scores it (hidden states at the scored positions,
then the model's own head code). Each test writes its own loop over these: that loop is the reference."""

from __future__ import annotations

import torch

from ferrytune.data import Batcher, load_examples, load_tokenizer, loss_per_sample, pad_id_for, pad_positions
from ferrytune.models import load_resident_model, logits_at


class PlainSetup:
    """``model`` (resident, eval mode, 64-byte aligned like the engine's blocks), ``params`` (named,
    a tied weight once, in param_id order), and the step-indexed batches of ``cfg``."""

    def __init__(self, cfg) -> None:
        self.model = load_resident_model(cfg.model.path).eval()
        self.params = list(self.model.named_parameters())
        self.tok = load_tokenizer(cfg.model.path)
        train, _ = load_examples(cfg.data, self.tok)
        t = cfg.train
        self.batcher = Batcher(train, global_batch_size=t.batch_size, seed=t.seed, shuffle=cfg.data.shuffle)

    def batch(self, step: int):
        (batch,) = pad_positions(self.batcher.batches_for_step(step, pad_id=pad_id_for(self.tok)))
        return batch

    def loss(self, batch) -> float:
        """The batch's mean loss at the scored positions (no grad)."""
        with torch.no_grad():
            h = self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            idx = batch.loss_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            return float(loss_per_sample(logits_at(self.model, torch.gather(h, 1, idx)), batch).sum()) / batch.batch_size

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params}


def resumed_and_replayed(cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train ``cfg`` stopped at step 3 and resumed from its last checkpoint, then rebuild it from its
    initial weights and ``zo_log.jsonl`` (``ZOTrainer.replay``): (resumed final weights, replayed weights)."""
    from safetensors.torch import load_file

    from ferrytune.engine import ZOTrainer
    from ferrytune.launch.train import run

    run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})}), progress=False)
    run(cfg.model_copy(update={"resume": "auto"}), progress=False)
    tr = ZOTrainer(cfg.model_copy(update={"output_dir": cfg.output_dir + "-replay", "resume": "never"}))
    tr.setup()
    try:
        dest = tr.replay(f"{cfg.output_dir}/zo_log.jsonl")
    finally:
        tr.close()
    return load_file(f"{cfg.output_dir}/final/model.safetensors"), load_file(f"{dest}/model.safetensors")


def assert_resume_and_replay_rebuild(cfg_factory, path, **opts) -> dict[str, torch.Tensor]:
    """Train ``cfg_factory(path, **opts)`` straight through, then stopped at step 3 and resumed, then
    replayed from its log: the three hold the same weights, bit for bit. Returns them."""
    from safetensors.torch import load_file

    from ferrytune.launch.train import run

    full = cfg_factory(path, **opts)
    run(full, progress=False)
    resumed, replayed = resumed_and_replayed(cfg_factory(path, **opts))
    a = load_file(f"{full.output_dir}/final/model.safetensors")
    assert all(torch.equal(resumed[k], a[k]) for k in a), "resumed != straight"
    assert all(torch.equal(replayed[k], a[k]) for k in a), "replayed != straight"
    return a
