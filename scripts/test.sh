#!/usr/bin/env bash
# Install specrt with its test dependencies (CPU torch from the local wheel) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q pybind11 ninja "cmake>=3.25" setuptools wheel
python -m pip install -q --no-build-isolation -e ".[test,bench]"
python -m pytest -q "$@"
