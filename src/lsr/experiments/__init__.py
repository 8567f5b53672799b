"""The paper's experiments, reproduced and extended.

- `loss_shapes`: target and non-target loss against the predicted probability (CE, exact LSR,
  SparseLSR), and what the seed snippet's sign variant optimises.
- `approximation`: how far SparseLSR is from exact label smoothing, in loss and gradient, against
  class count, smoothing and confidence.
- `train`: `lsr-train`, a training comparison of the losses with t-SNE of the penultimate layer;
  its pieces are `data` (datasets), `models` (networks), `training` (losses, loop, metrics),
  `outputs` (files and figure) and `run` (one experiment end to end).
- `report`: writes results/experiments/README.md from the files the others produce.

`python -m lsr.experiments` runs all of them with their defaults.

Every curve is computed by calling the library's loss functions on logits built to realise the
probabilities on the x axis; no loss formula is typed again here.
"""

DEFAULT_OUT = "results/experiments"
