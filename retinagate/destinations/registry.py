"""The destination kinds, registered in one place.

Each entry names a protocol and the class that speaks it (:class:`retinagate.destinations.base.Destination`).
A setting's text is offered to each kind in turn; the first whose form it has parses it. The modules
import their protocol libraries (pynetdicom, dicomweb-client) only when they send, so the gateway can
validate settings without loading them. Adding a kind means adding its module and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

if TYPE_CHECKING:
    from retinagate.destinations.base import Destination

__all__ = ["kinds", "parse"]

#: Module and class of each kind (the class names its protocol).
_KINDS: Final = (
    ("retinagate.destinations.dimse", "DimseDestination"),
    ("retinagate.destinations.stow", "StowDestination"),
)


@cache
def kinds() -> tuple[type[Destination], ...]:
    """Every destination class, in the order a setting's text is offered to them."""
    return tuple(getattr(importlib.import_module(module), attribute) for module, attribute in _KINDS)


def parse(entry: str | Mapping[str, Any]) -> Destination:
    """The destination an entry of the ``destinations`` setting names: its address (``AE@host:port``,
    ``https://host/dicom-web``, ...), or a table with ``address`` and the destination's own settings
    (``name``, ``tls``, ``tls_ca``, ``tls_cert``, ``tls_key``; for STOW-RS ``username`` and
    ``password_file`` or ``token_file``).

    Raises:
        ValueError: When no kind takes the address, or the kind whose form it has finds it wrong (the
            message says which forms there are), or a table holds a setting its kind does not have.
    """
    if not isinstance(entry, str):
        options = dict(entry)
        address = options.pop("address", None)
        if not isinstance(address, str):
            raise ValueError(f"destination {options.get('name', entry)!r}: a table needs an 'address' (text)")
        found = parse(address)
        unknown = sorted(set(options) - type(found).option_names())
        if unknown:
            known = ", ".join(sorted(type(found).option_names()))
            raise ValueError(
                f"destination {address}: {', '.join(unknown)} is not a setting of a {found.protocol} "
                f"destination ({known})"
            )
        try:
            return type(found).model_validate({**found.model_dump(exclude_none=True), **options})
        except ValidationError as exc:  # one line per problem, without pydantic's decoration
            problems = "; ".join(_problem(error) for error in exc.errors())
            raise ValueError(f"destination {address}: {problems}") from None
    text = entry
    for kind in kinds():
        destination = kind.parse(text)
        if destination is not None:
            return destination
    forms = " nor ".join(kind.form for kind in kinds())
    raise ValueError(f"destination {text!r} is neither {forms}")


def _problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message
