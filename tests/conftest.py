"""Test-wide settings: no network, no telemetry, and the fixture modules each feature brings."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = ["tests.fixtures_lora", "tests.fixtures_flux", "tests.fixtures_hub", "tests.fixtures_app"]
