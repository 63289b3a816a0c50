"""Built-in optimization units; importing this package registers them (class definitions only)."""

from . import channels_last, compile, precision  # noqa: F401
from . import attention  # noqa: F401
from . import deepcache, freeu  # noqa: F401
from . import offload  # noqa: F401
from . import vae  # noqa: F401
from . import winograd  # noqa: F401
