import pytest


@pytest.fixture(scope="session")
def cpu_op():
    """The FlashMask CPU op, built once per session if build/custom_ops has no current copy."""
    from paddle_ernie5.ops import flashmask

    return flashmask._cpu_op()
