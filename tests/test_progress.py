"""Progress lines for the first replica's actor log (the dashboard's Actors page): when they are
sent, what they say, and that the driver's console leaves them out."""

from raytorch.output.progress import MARK, ProgressLog, clock, progress_line, without_marked


def test_a_progress_line_says_epoch_step_loss_speed_and_eta():
    line = progress_line(2, 120, 300, 0.0421, 1830.4, elapsed_s=48.0)
    assert line == f"{MARK} epoch 2, step 120/300 (40%), loss 0.0421, 1,830 samples/s, ETA 1m12s"
    assert progress_line(0, 0, 10, None, 0.0, 0.0).endswith("loss -, 0 samples/s, ETA -")
    assert [clock(s) for s in (5, 65, 3725)] == ["5s", "1m5s", "1h2m5s"]


def test_lines_go_at_each_epoch_end_and_at_most_every_ten_seconds():
    now, sent = [0.0], []
    log = ProgressLog(sent.append, total_steps=100, every_s=10.0, clock_fn=lambda: now[0])
    step = {"epoch": 0, "step": 1, "running_loss": 0.5, "samples_per_s": 100.0}
    for t in (1.0, 5.0, 9.9):
        now[0] = t
        log.on_steps([dict(step, step=int(t))])
    assert sent == []
    now[0] = 10.5
    log.on_steps([dict(step, step=10)])
    now[0] = 12.0
    log.on_steps([dict(step, step=12)])
    assert len(sent) == 1 and "step 10/100" in sent[0]
    log.on_epoch({"epoch": 0, "steps": 50, "loss": 0.25, "samples_per_s": 120.0})
    assert len(sent) == 2 and "epoch 0 done, step 50/100 (50%), loss 0.25" in sent[1]


def test_the_console_leaves_marked_lines_out_and_prints_the_rest():
    printed = []
    printing = without_marked(printed.append)
    printing({"lines": [f"{MARK} epoch 0 done", "a user's print"], "pid": 7})
    printing({"lines": [f"{MARK} epoch 1 done"], "pid": 7})
    assert printed == [{"lines": ["a user's print"], "pid": 7}]
