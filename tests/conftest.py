import pytest

import lsr


def cpu_implementations() -> list[lsr.Implementation]:
    return lsr.available("cpu")


@pytest.fixture(params=[impl.name for impl in cpu_implementations()])
def impl(request) -> lsr.Implementation:
    return lsr.get(request.param)
