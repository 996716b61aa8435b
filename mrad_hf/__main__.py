# SPDX-License-Identifier: Apache-2.0
"""`python -m mrad_hf ...` is the `mrad` command."""

from mrad_hf.cli import main

raise SystemExit(main())
