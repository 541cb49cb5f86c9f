"""Session-wide settings for the test run."""

from workbench.cli import single_threaded_blas

# As the command line does: small NumPy matrices on one BLAS thread (threads spinning beside
# torch's on two cores make them many times slower).
single_threaded_blas()

import torch  # noqa: E402

# Two cores, shared with the browser test's server and browser: more intra-op threads than free
# cores makes torch's pool spin and slows the tiny models a hundredfold.
torch.set_num_threads(1)


import logging  # noqa: E402

import pytest  # noqa: E402


class _Deprecations(logging.Handler):
    """transformers announces some deprecations through its logger rather than ``warnings``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_library_deprecations():
    """Deprecations from the libraries the workbench reaches into fail the test that met them (the
    ``FutureWarning``/``DeprecationWarning`` ones are errors by pyproject's ``filterwarnings``)."""
    handler = _Deprecations()
    loggers = [logging.getLogger(name) for name in ("transformers", "nnsight")]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)
    assert not handler.messages, f"a library deprecation was announced: {handler.messages[0]}"
