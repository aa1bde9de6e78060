"""`vae-eval ckpt_path=PATH`: evaluate a checkpoint on the test split (not yet implemented)."""

import sys


def main() -> None:
    print("vae-eval: not yet implemented (see the evaluation issue).", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
