"""Shared set-up for the Python tests: paths, and a summary of the measured
figures printed at the end of the run whatever pytest's capture mode."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

_figures = []


@pytest.fixture(scope="session")
def report():
    """report(line): prints the line now and again in the closing summary."""

    def add(line):
        print(line)
        _figures.append(line)

    return add


def pytest_terminal_summary(terminalreporter):
    if _figures:
        terminalreporter.section("measured")
        for line in _figures:
            terminalreporter.write_line(line)
