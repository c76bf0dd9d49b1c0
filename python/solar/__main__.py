"""``python -m solar calibrate|refine|polish ...``: the PyTorch-side companions of the ``solar``
command line tool (which compresses and restores without PyTorch): statistics for ``solar compress
--calib``, compression with the model in the loop, and a finished file's integers polished against
the model."""
import sys

USAGE = ("usage: python -m solar calibrate --base-model DIR --adapter DIR --out FILE (--text FILE | --self) "
         "[--reweigh-bytes B]\n"
         "       python -m solar refine --base-model DIR --adapter DIR --out FILE.solar --target-bytes B "
         "(--text FILE | --self) [--calib FILE]\n"
         "       python -m solar polish --base-model DIR --adapter DIR --in FILE.solar --out FILE.solar "
         "(--text FILE | --self)\n"
         "       (python -m solar <command> --help for the options)")

if len(sys.argv) < 2 or sys.argv[1] not in ("calibrate", "refine", "polish"):
    print(USAGE, file=sys.stderr)
    raise SystemExit(2)
if sys.argv[1] == "calibrate":
    from .calibrate import cli_main
elif sys.argv[1] == "refine":
    from .refine import cli_main
else:
    from .polish import cli_main
raise SystemExit(cli_main(sys.argv[2:]))
