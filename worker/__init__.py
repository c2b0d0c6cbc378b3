"""RetinaGate's worker: Celery tasks that score stored instances, deliver the results to PACS,
sweep up lost work and re-score stored studies when the model changes.

The package never configures logging (a ``NullHandler`` only); entry points do.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
