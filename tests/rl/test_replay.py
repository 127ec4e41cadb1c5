import threading
import time

from paddle_ernie5.rl.replay import UnbiasedReplayBuffer


def test_groups_are_released_in_assignment_order_whatever_the_completion_order():
    # Group g's rollouts take longer the EARLIER the group and the earlier the slot; with a worker
    # per in-flight rollout, later groups and later slots finish first.
    durations = {}

    def assign(g):
        return [f"q{g}.{j}" for j in range(2)]

    def rollout(g, j, query, ctx):
        time.sleep(0.04 * (4 - g) + 0.01 * (2 - j))
        durations[(g, j)] = threading.current_thread().name
        return (query, ctx)

    buf = UnbiasedReplayBuffer(
        assign, rollout, context=lambda g: f"weights@{g}", lookahead=2, workers=6
    )
    buf.start()
    released = []
    for _ in range(4):
        g, results = buf.next_group()
        released.append(g)
        assert [q for q, _ in results] == assign(g)  # slot order, not completion order
        assert all(ctx == f"weights@{g}" for _, ctx in results)  # captured at submission
    buf.close()
    assert released == [0, 1, 2, 3]
    log = buf.completion_log
    assert log != sorted(log), "the workers should have finished out of order"
    assert log[0] == (2, 1) and log.index((0, 0)) > log.index((1, 0)), "later groups finished first"
    assert all(name.startswith("urb") for name in durations.values())  # background threads


def test_a_group_waits_for_its_longest_rollout():
    def rollout(g, j, query, ctx):
        time.sleep(0.15 if j == 0 else 0.0)
        return j

    buf = UnbiasedReplayBuffer(lambda g: [0, 1, 2], rollout, lookahead=0, workers=2)
    t0 = time.perf_counter()
    g, results = buf.next_group()
    assert time.perf_counter() - t0 >= 0.15 and results == [0, 1, 2]
    buf.close()


def test_synchronous_mode_and_resume_start():
    calls = []
    buf = UnbiasedReplayBuffer(
        lambda g: [g], lambda g, j, q, ctx: calls.append(g) or q, lookahead=1, workers=0
    )
    buf.start(5)
    assert buf.next_group() == (5, [5]) and buf.next_group() == (6, [6])
    assert calls == [5, 6, 7]  # one group of look-ahead, computed in order
    buf.close()
