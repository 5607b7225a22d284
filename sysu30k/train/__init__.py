"""Training: the shared loop (epochs, checkpoints, exact resume, DDP, logs, validation), the optimiser
builder, ``sysu30k train-weak`` (DGL and its baselines, :mod:`.weak` with the losses of :mod:`.losses`)
and ``sysu30k train-ssg`` (:mod:`.ssg`).

The top of the stack: may import every stage below it (io, release, split.holdout, loader, model,
evaluation for validation); nothing imports it but the CLI.
"""
