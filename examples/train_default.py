"""The default system of `npcpu train`, written with the public API.

A FusedLinearReLU MLP on the synthetic teacher-labelled data set; LAMB wrapped in Lookahead;
bf16 storage; gradient accumulation; linear warmup then cosine decay; dynamic layer freezing.

    python examples/train_default.py [RUN_DIR]
"""

import sys

from npcpu.data import SyntheticClassification
from npcpu.nn import CrossEntropyLoss, FusedLinearReLU, Linear, Sequential
from npcpu.optim import LAMB, LambdaLR, Lookahead, schedules
from npcpu.train import DynamicFreezer, Trainer

INPUT_DIM, CLASSES, TRAIN, EVAL = 128, 10, 100_000, 10_000
BATCH, ACCUMULATION, EPOCHS = 128, 2, 4

data = SyntheticClassification(TRAIN + EVAL, INPUT_DIM, CLASSES, seed=0)
train_set, eval_set = data.subset(0, TRAIN), data.subset(TRAIN, TRAIN + EVAL)

model = Sequential(
    FusedLinearReLU(INPUT_DIM, 1024, seed=0),
    FusedLinearReLU(1024, 512, seed=1),
    FusedLinearReLU(512, 512, seed=2),
    Linear(512, CLASSES, seed=3),
)
weights = [p for p in model.parameters() if p.data.ndim > 1]
biases = [p for p in model.parameters() if p.data.ndim == 1]
optimizer = Lookahead(LAMB([{"params": weights},
                            {"params": biases, "weight_decay": 0.0, "adaptation": False}],
                           lr=4e-3, weight_decay=0.01),
                      k=5, alpha=0.5)

steps = EPOCHS * -(-TRAIN // (BATCH * ACCUMULATION))
scheduler = LambdaLR(optimizer, schedules.warmup_cosine_decay_schedule(
    init_value=0.01, peak_value=1.0, warmup_steps=100, decay_steps=steps, end_value=0.01))

trainer = Trainer(model, CrossEntropyLoss(), optimizer, scheduler=scheduler,
                  accumulation_steps=ACCUMULATION, precision="bf16", clip_grad_norm=1.0,
                  freezer=DynamicFreezer(threshold=0.45, patience=30, window=10, start_step=600))
result = trainer.fit(train_set, epochs=EPOCHS, batch_size=BATCH, eval_data=eval_set,
                     eval_every=200, run_dir=sys.argv[1] if len(sys.argv) > 1 else None)
print(f"eval accuracy {result['eval_accuracy']:.4f} (chance {1 / CLASSES:.2f})")
