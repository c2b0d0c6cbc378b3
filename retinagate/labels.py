"""The RFMiD label scheme served by RetinaGate.

RFMiD (Retinal Fundus Multi-disease Image Dataset) annotates 46 conditions. The model predicts 29 of
them: ``Disease_Risk`` (any abnormality), the 27 conditions with enough examples to learn, and
``OTHER``, which is positive when any of the remaining 18 rarer conditions is present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DIFFUSE_LABELS",
    "DISEASE_LABELS",
    "DISEASE_RISK",
    "LABELS",
    "LABEL_DESCRIPTIONS",
    "NUM_LABELS",
    "OTHER",
    "OTHER_COLUMNS",
    "RFMID_COLUMNS",
    "labels_from_rfmid_row",
]

DISEASE_RISK: Final = "Disease_Risk"
OTHER: Final = "OTHER"

#: The 27 named conditions the model predicts, in RFMiD column order.
NAMED_DISEASES: Final[tuple[str, ...]] = (
    "DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS", "MS", "CSR", "ODC", "CRVO", "TV",
    "AH", "ODP", "ODE", "ST", "AION", "PT", "RT", "RS", "CRS", "EDN", "RPEC", "MHL", "RP",
)  # fmt: skip

#: Named conditions seen over the retina as a whole rather than in lesions: media haze veils the view,
#: tessellation is a pattern of the choroid showing through. Sets annotated by lesion (IDRiD, FGADR, DDR)
#: draw no mask for them; training takes a positive one without a mask to cover the field of view.
DIFFUSE_LABELS: Final[tuple[str, ...]] = ("MH", "TSLN")

#: The 18 rarer RFMiD conditions folded into ``OTHER``.
OTHER_COLUMNS: Final[tuple[str, ...]] = (
    "CWS", "CB", "ODPM", "PRH", "MNF", "HR", "CRAO", "TD", "CME", "PTCR", "CF", "VH", "MCA", "VS",
    "BRAO", "PLQ", "HPED", "CL",
)  # fmt: skip

#: The 46 label columns of an RFMiD CSV (after ``ID``), in file order.
RFMID_COLUMNS: Final[tuple[str, ...]] = (DISEASE_RISK, *NAMED_DISEASES, *OTHER_COLUMNS)

#: The 28 disease outputs (everything but ``Disease_Risk``).
DISEASE_LABELS: Final[tuple[str, ...]] = (*NAMED_DISEASES, OTHER)

#: The 29 model outputs, in output order.
LABELS: Final[tuple[str, ...]] = (DISEASE_RISK, *DISEASE_LABELS)
NUM_LABELS: Final = len(LABELS)

LABEL_DESCRIPTIONS: Final[Mapping[str, str]] = {
    DISEASE_RISK: "Disease risk (any abnormality)",
    "DR": "Diabetic retinopathy",
    "ARMD": "Age-related macular degeneration",
    "MH": "Media haze",
    "DN": "Drusen",
    "MYA": "Myopia",
    "BRVO": "Branch retinal vein occlusion",
    "TSLN": "Tessellation",
    "ERM": "Epiretinal membrane",
    "LS": "Laser scars",
    "MS": "Macular scar",
    "CSR": "Central serous retinopathy",
    "ODC": "Optic disc cupping",
    "CRVO": "Central retinal vein occlusion",
    "TV": "Tortuous vessels",
    "AH": "Asteroid hyalosis",
    "ODP": "Optic disc pallor",
    "ODE": "Optic disc edema",
    "ST": "Optociliary shunt",
    "AION": "Anterior ischemic optic neuropathy",
    "PT": "Parafoveal telangiectasia",
    "RT": "Retinal traction",
    "RS": "Retinitis",
    "CRS": "Chorioretinitis",
    "EDN": "Exudation",
    "RPEC": "Retinal pigment epithelium changes",
    "MHL": "Macular hole",
    "RP": "Retinitis pigmentosa",
    OTHER: "Other rare condition",
}


def labels_from_rfmid_row(row: Mapping[str, str | int | float]) -> NDArray[np.uint8]:
    """Maps one RFMiD CSV row (46 label columns) to the 29 model labels.

    Args:
        row: Column name to value; values are 0/1 as ints, floats or strings.

    Returns:
        A ``uint8`` vector of length 29 in :data:`LABELS` order.

    Raises:
        ValueError: If a column is missing or holds something other than 0 or 1.
    """

    def flag(column: str) -> int:
        if column not in row:
            raise ValueError(f"RFMiD row is missing the column {column!r}")
        raw = row[column]
        try:
            value = int(float(raw))
        except (TypeError, ValueError):
            raise ValueError(f"RFMiD column {column!r} holds {raw!r}; expected 0 or 1") from None
        if value not in (0, 1):
            raise ValueError(f"RFMiD column {column!r} holds {raw!r}; expected 0 or 1")
        return value

    out = np.zeros(NUM_LABELS, dtype=np.uint8)
    out[0] = flag(DISEASE_RISK)
    for i, name in enumerate(NAMED_DISEASES, start=1):
        out[i] = flag(name)
    out[-1] = int(any(flag(c) for c in OTHER_COLUMNS))
    return out


def label_index(name: str, labels: Sequence[str] = LABELS) -> int:
    """Returns the output index of ``name``; raises ``ValueError`` naming the known labels."""
    try:
        return labels.index(name)
    except ValueError:
        raise ValueError(f"unknown label {name!r}; known labels: {', '.join(labels)}") from None
