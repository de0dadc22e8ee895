"""Trains a small network with checkpoints; tests kill it with SIGKILL and run it again.

    python tests/kill_driver.py RAW_DIR CHECKPOINT OUT.pt
Prints 'ready' once the data is loaded, then 'step EPOCH IMAGES' every 20 training steps
(the test kills it on seeing one); writes the final state_dict to OUT.pt.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import atomic, checkpoint, data, train  # noqa: E402
from pipeline.model import ModelConfig, Net  # noqa: E402

CFG = train.TrainConfig(epochs=2, batch_size=32, subset=2048, checkpoint_every=3, seed=3)
MODEL = ModelConfig(channels=(8, 16), fc_units=64)

raw, ckpt, out = (Path(a) for a in sys.argv[1:4])
train.seed_everything(CFG.seed, 2)
x_np, y_np = data.load_split(raw, "train")
x, y = train.to_tensors(x_np[:CFG.subset], y_np[:CFG.subset], torch.device("cpu"))
model = train.prepare(Net(MODEL), torch.device("cpu"))
print("ready", flush=True)
training = train.Training.start(model, CFG, x, y, ckpt if ckpt.name != "none" else None,
                                checkpoint.fingerprint(MODEL, CFG))
for _ in training.remaining_epochs():
    row = training.run_epoch(on_step=lambda done, loss: print(f"step {training.epoch} {done}", flush=True))
    training.end_epoch(row)
with atomic.atomic_path(out) as tmp:
    torch.save(model.state_dict(), tmp)
if ckpt.name != "none":
    ckpt.unlink(missing_ok=True)
