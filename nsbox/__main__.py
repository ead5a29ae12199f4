"""`python -m nsbox` runs the CLI, through the same entry point as the `nsbox` script.

That entry point (`command.main`) runs a plain `nsbox run` without importing click; the
re-execution into a systemd scope (`command._reexec_in_a_delegated_scope_if_needed`)
comes back through here.
"""

import sys

from nsbox.command import main

sys.exit(main())
