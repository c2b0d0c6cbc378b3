"""RetinaGate's DICOM gateway: a C-STORE SCP that stores what fundus cameras send, durably, and
hands each instance to the score queue. Started by ``retinagate gateway``.

The package never configures logging (a ``NullHandler`` only); entry points do.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
