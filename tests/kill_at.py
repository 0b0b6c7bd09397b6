"""`python tests/kill_at.py POINT STEP MODULE ARGS...`: runs `python -m MODULE ARGS...` and kill -9s itself
at one exact point, so a test can resume from what a real kill leaves on disk (Orbax saves in flight too).

POINT: `sigterm` / `sigint` (sends itself SIGTERM / SIGINT, i.e. Ctrl-C, after step STEP's loss is checked:
a real signal, at a known step),
`step` (after step STEP's loss is checked: inside the loop, before its log record and checkpoint),
`validated` (right after the validation record at STEP reached metrics.jsonl), `best.json` (right after
best.json was written at STEP, before the validation's record reached metrics.jsonl).
"""

import os
import runpy
import signal
import sys

point, at, module = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = [module, *sys.argv[4:]]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
# Ctrl-C as in a terminal: a test runner started in the background (`cmd &` without job control, as some CI
# shells do) starts its children with SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
if point in ("step", *SIGNALS):
    from cbir_jax.training import guards

    check = guards.check_loss

    def check_loss(step, loss):
        check(step, loss)
        if step == at:
            die() if point == "step" else os.kill(os.getpid(), SIGNALS[point])

    guards.check_loss = check_loss
elif point == "validated":
    from cbir_jax.training import metrics_log

    write = metrics_log.MetricsLog.write

    def write_record(self, record):
        write(self, record)
        if record["step"] == at and "best_step" in record:
            die()

    metrics_log.MetricsLog.write = write_record
elif point == "best.json":
    from cbir_jax.training import selection

    save = selection.Selection.save

    def save_selection(self, run_dir):
        save(self, run_dir)
        if self.history and self.history[-1]["step"] == at:
            die()

    selection.Selection.save = save_selection
else:
    raise SystemExit(f"unknown kill point {point}")
runpy.run_module(module, run_name="__main__", alter_sys=True)
