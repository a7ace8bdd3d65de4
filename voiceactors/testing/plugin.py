"""pytest plugin for voiceactors and for projects that test against it.

Enable it with ``-p voiceactors.testing.plugin`` (or ``pytest_plugins = [...]`` in a
conftest). It provides:

``leak_check`` (autouse)
    Every Trio test runs under ``leaks.leak_checked_run``: once the test and its fixtures
    are done, a task still alive, a pending deadline or an unclosed edge fails the test.
    Opt out with ``@pytest.mark.leaks_allowed(reason)``.

``realtime_sim``
    A simulator running in the test's Trio run on 127.0.0.1 (free port), default
    config; for a script or a fault plan use ``voiceactors.testing.sim.open_simulator``.
"""

from __future__ import annotations

from typing import Any

import pytest

from .leaks import leak_checked_run
from .sim import realtime_sim as realtime_sim  # noqa: F401  (a fixture for users' tests)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaks_allowed(reason): do not check the test for left-over tasks"
    )


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> None:
    """Check that a Trio test leaves no task, deadline or channel behind (see module doc).

    A sync fixture on purpose: it runs in pytest's setup phase, before pytest-trio picks
    the runner, and swaps in the checking one by prepending a ``trio`` marker.
    """
    node = request.node
    marker = node.get_closest_marker("trio")
    if marker is None or node.get_closest_marker("leaks_allowed") is not None:
        return
    base = marker.kwargs.get("run")

    def run(fn: Any, **kwargs: Any) -> Any:
        if base is None:
            return leak_checked_run(fn, **kwargs)
        return leak_checked_run(fn, run=base, **kwargs)

    node.add_marker(pytest.mark.trio(run=run), append=False)
