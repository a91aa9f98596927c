"""skorch classifiers that run the papers' procedures and tune with plain scikit-learn syntax.

- :class:`PoolingCNNClassifier` — a pooling network (:class:`~skpool.models.PoolingCNN`, or
  :class:`~skpool.models.ResNet18` as ``module``) as a scikit-learn classifier (any stage and
  global pooling), with ``device="auto"`` and a ``random_state``.
- :class:`DGMPClassifier` — the network with a learnable-λ generalized max pooling head
  (Christlein et al. 2019); ``module__lam`` is the initial λ, ``lam_lr_factor`` scales λ's
  learning rate (the paper multiplies it by up to 1000).
- :class:`SeparabilityPoolingClassifier` — Birodkar et al.'s procedure in ``fit``: train with a
  default pooling at one or more downsampling points, fit :class:`~skpool.SeparabilityPooling`
  on each point's training feature maps in turn, swap in the learned operator, retrain.

Input images are arrays or tensors of shape ``(n, H, W)`` (one channel, e.g. digits reshaped to
``(n, 8, 8)``) or ``(n, C, H, W)`` (channels first, as torch layers take them), converted to
float32. Labels are anything scikit-learn classifiers take (strings, any integers); the
module's number of classes, input channels and input size come from the training data unless
set with ``module__<name>``.

The implementation lives in private modules; this one holds only the public names.
"""

from ._procedure import SeparabilityPoolingClassifier
from ._skorch import DGMPClassifier, PoolingCNNClassifier

__all__ = ["PoolingCNNClassifier", "DGMPClassifier", "SeparabilityPoolingClassifier"]
