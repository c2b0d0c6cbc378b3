"""Tests for retinagate.outputs.registry: the output kinds in one place, in build order."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from retinagate.outputs import registry
from retinagate.settings import Settings, SettingsError


def test_every_registered_kind_is_built_by_a_class_of_that_name() -> None:
    assert registry.names() == ("sc", "pm", "sr")
    for name in registry.names():
        assert registry.kind_class(name).name == name


def test_the_sr_is_planned_after_what_it_references_and_a_plain_files_sr_brings_its_sc() -> None:
    assert registry.plan(["sr", "pm", "sc"], references_source=True) == ["sc", "pm", "sr"]
    assert registry.plan(["sr"], references_source=True) == ["sr"]
    assert registry.plan(["sr"], references_source=False) == ["sc", "sr"]


def test_the_outputs_setting_refuses_a_kind_that_is_not_registered_by_name(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(SettingsError, match="outputs") as caught:
        make_settings(outputs=["sc", "xray"])
    assert "'xray' is not a kind" in str(caught.value)
    assert make_settings(outputs="sr,sc,sr").outputs == ["sr", "sc"]


def test_validating_the_outputs_setting_loads_no_writer() -> None:
    code = (
        "import sys\nfrom retinagate.settings import Settings\nSettings(outputs=['sc', 'pm'])\n"
        "print(sorted({'cv2', 'highdicom', 'retinagate.outputs.sc'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_study_report_is_an_output_kind_of_rows_but_not_a_per_photograph_choice(
    make_settings: Callable[..., Settings],
) -> None:
    from retinagate.models import Output

    assert registry.stored_names() == (*registry.names(), "study")
    assert Output(kind="study").kind == "study"
    with pytest.raises(ValueError, match="kind: 'nope' is not a kind"):
        Output(kind="nope")
    with pytest.raises(SettingsError, match="outputs"):
        make_settings(outputs="sc,study")
