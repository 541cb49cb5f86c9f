"""Session-wide settings for the test run."""

from workbench.cli import single_threaded_blas

# As the command line does: small NumPy matrices on one BLAS thread (threads spinning beside
# torch's on two cores make them many times slower).
single_threaded_blas()

import torch  # noqa: E402

# Two cores, shared with the browser test's server and browser: more intra-op threads than free
# cores makes torch's pool spin and slows the tiny models a hundredfold.
torch.set_num_threads(1)
