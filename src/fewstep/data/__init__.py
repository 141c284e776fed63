"""Training data: datasets that yield (x0, cond) batches (analytic mixtures, 2-D toys, sklearn digits)."""

import fewstep.data.images  # noqa: E402,F401  (registers the image sets digits8 and digits16 with get_dataset)
