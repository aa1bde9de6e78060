"""`vae-compare LOGDIR [LOGDIR ...]`: a table of runs and a plot (not yet implemented)."""

import sys


def main() -> None:
    print("vae-compare: not yet implemented (see the evaluation issue).", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
