"""When a run makes its downstream report: at its end, deferred in a sweep's trial, or never."""

import pytest

from vaelab.errors import ConfigError
from vaelab.report import downstream_plan


@pytest.mark.parametrize(
    ("downstream", "in_sweep", "is_trial", "plan"),
    [
        (True, "deferred", False, "inline"),  # a single run always reports at its end
        (True, "deferred", True, "deferred"),
        (True, "inline", True, "inline"),
        (False, "deferred", True, "off"),
        (False, "inline", False, "off"),
    ],
)
def test_a_sweeps_trial_defers_its_report_unless_told_inline(downstream, in_sweep, is_trial, plan):
    assert downstream_plan(downstream, in_sweep, is_trial) == plan


def test_a_misspelt_choice_is_named_with_the_choices():
    with pytest.raises(ConfigError, match="evaluation.in_sweep must be one of deferred, inline"):
        downstream_plan(True, "later", True)
