"""The RFMiD label scheme."""

from __future__ import annotations

import pytest

from retinagate.labels import LABELS, NUM_LABELS, OTHER_COLUMNS, RFMID_COLUMNS, label_index, labels_from_rfmid_row


def test_scheme_has_29_outputs_from_46_rfmid_columns() -> None:
    assert NUM_LABELS == 29
    assert len(RFMID_COLUMNS) == 46
    assert len(OTHER_COLUMNS) == 18
    assert LABELS[0] == "Disease_Risk"
    assert LABELS[-1] == "OTHER"
    assert len(set(RFMID_COLUMNS)) == 46


def test_rare_columns_fold_into_other() -> None:
    row = dict.fromkeys(RFMID_COLUMNS, "0")
    row["Disease_Risk"] = "1"
    row["DR"] = "1"
    row["CRAO"] = "1"
    labels = labels_from_rfmid_row(row)
    assert labels[label_index("Disease_Risk")] == 1
    assert labels[label_index("DR")] == 1
    assert labels[label_index("OTHER")] == 1
    assert int(labels.sum()) == 3


def test_missing_or_bad_columns_are_named() -> None:
    row = dict.fromkeys(RFMID_COLUMNS, 0)
    del row["ARMD"]
    with pytest.raises(ValueError, match="ARMD"):
        labels_from_rfmid_row(row)
    row["ARMD"] = 2
    with pytest.raises(ValueError, match="'ARMD' holds 2"):
        labels_from_rfmid_row(row)


def test_unknown_label_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Disease_Risk"):
        label_index("GLAUCOMA")
