"""Self-checks for the lessons' exercises: ``check_<name>(fn)`` after each exercise (see ``core``).

One module per lesson; every check is re-exported here, so a notebook writes
``from minisd import exercises`` and then ``fn = exercises.check_fn(fn)``.
"""

from .core import Case, ExerciseError, check, compare, describe_inputs
from .lesson01 import *  # noqa: F401,F403  lesson 01: forward diffusion
from .lesson02 import *  # noqa: F401,F403  lesson 02: noise schedules
from .lesson03 import *  # noqa: F401,F403  lesson 03: pixel-space DDPM
from .lesson04 import *  # noqa: F401,F403  lesson 04: samplers
from .lesson05 import *  # noqa: F401,F403  lesson 05: the VAE
from .lesson06 import *  # noqa: F401,F403  lesson 06: the compression factor
from .lesson07 import *  # noqa: F401,F403  lesson 07: text encoders
from .lesson08 import *  # noqa: F401,F403  lesson 08: the cross-attention U-Net
from .lesson09 import *  # noqa: F401,F403  lesson 09: training text-to-image
from .lesson10 import *  # noqa: F401,F403  lesson 10: text-to-image and classifier-free guidance
from .lesson11 import *  # noqa: F401,F403  lesson 11: image-to-image
from .lesson12 import *  # noqa: F401,F403  lesson 12: inpainting
from .lesson13 import *  # noqa: F401,F403  lesson 13: the real thing
