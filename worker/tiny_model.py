"""``python -m worker.tiny_model``: the command of the tiny-checkpoint builder, worker.runtime.tiny_model."""

from worker.runtime.tiny_model import main

if __name__ == "__main__":
    raise SystemExit(main())
