"""``python -m solar calibrate ...``: the PyTorch-side companion of the ``solar`` command line
tool (which compresses and restores without PyTorch): statistics for ``solar compress --calib``."""
import sys

from .calibrate import cli_main

if len(sys.argv) < 2 or sys.argv[1] != "calibrate":
    print("usage: python -m solar calibrate --base-model DIR --adapter DIR --out FILE (--text FILE | --self)\n"
          "       (python -m solar calibrate --help for the options)", file=sys.stderr)
    raise SystemExit(2)
raise SystemExit(cli_main(sys.argv[2:]))
