"""The continuous engine's pure scheduler: admission within the KV budget, isolation, classify, deadlines."""

from __future__ import annotations

from worker.scheduler import Step, Ticket, classify_footprint, footprint, schedule

NOW = 100.0


def job(id: int, tokens: int = 10, deadline: float = 1e9, **kind: bool) -> Ticket:
    return Ticket(id, tokens, deadline, **kind)


def test_footprint_is_rows_times_the_widest_reservation() -> None:
    assert footprint([]) == 0
    assert footprint([10, 30, 20]) == 90


def test_nothing_waiting_and_nothing_running_is_idle() -> None:
    assert schedule([], [], NOW, budget=100, max_rows=4) == Step()
    assert Step().idle and not Step(decode=True).idle


def test_waiting_jobs_join_within_the_budget_and_decode_in_the_same_step() -> None:
    step = schedule([job(1), job(2), job(3)], [job(0)], NOW, budget=30, max_rows=8)
    assert step.admit == [1, 2] and step.decode  # 3 rows x 10 = 30: a fourth would over-commit


def test_admission_counts_the_padded_footprint_not_the_sum() -> None:
    # 10 + 40 = 50 tokens, but a left-padded batch of 2 rows 40 wide may reach 80.
    assert schedule([job(1, 40)], [job(0, 10)], NOW, budget=79, max_rows=8).admit == []
    assert schedule([job(1, 40)], [job(0, 10)], NOW, budget=80, max_rows=8).admit == [1]


def test_admission_never_exceeds_the_budget_for_any_mix() -> None:
    sizes = [7, 31, 12, 55, 3, 40, 22, 9, 60, 18]
    for budget in range(60, 400, 7):
        for start in range(len(sizes)):
            running = [job(100 + i, s) for i, s in enumerate(sizes[:start])][:2]
            if footprint([r.tokens for r in running]) > budget:
                continue
            waiting = [job(i, s) for i, s in enumerate(sizes[start:])]
            step = schedule(waiting, running, NOW, budget, max_rows=6)
            held = [r.tokens for r in running] + [j.tokens for j in waiting if j.id in step.admit]
            assert footprint(held) <= budget and len(held) <= 6


def test_a_job_that_does_not_fit_blocks_later_generate_jobs_but_not_classify() -> None:
    waiting = [job(1, 50), job(2, 5), job(3, 5, classify=True)]
    step = schedule(waiting, [job(0, 20)], NOW, budget=60, max_rows=8)
    assert step.admit == [] and step.classify == [3] and step.decode  # 2 would overtake 1: it waits


def test_row_cap() -> None:
    step = schedule([job(1), job(2)], [job(0)], NOW, budget=10_000, max_rows=2)
    assert step.admit == [1]


def test_a_job_bigger_than_the_whole_budget_fails_at_once() -> None:
    step = schedule([job(1, 101), job(2, 10)], [], NOW, budget=100, max_rows=8)
    assert step.too_big == [1] and step.admit == [2]


def test_deadlines_expire_waiting_jobs_and_time_out_running_rows() -> None:
    step = schedule([job(1, deadline=NOW), job(2)], [job(0, deadline=NOW - 1), job(3)], NOW, 100, 8)
    assert step.expired == [1] and step.timed_out == [0] and step.admit == [2] and step.decode


def test_an_isolated_job_waits_for_running_rows_to_finish_then_runs_alone() -> None:
    waiting = [job(1, isolated=True), job(2), job(3, classify=True)]
    draining = schedule(waiting, [job(0)], NOW, budget=1000, max_rows=8)
    assert draining.admit == [] and draining.classify == [] and draining.decode
    alone = schedule(waiting, [], NOW, budget=1000, max_rows=8)
    assert alone.admit == [1] and alone.classify == []
    running_alone = schedule([job(2), job(3, classify=True)], [job(1, isolated=True)], NOW, 1000, 8)
    assert running_alone.admit == [] and running_alone.classify == [] and running_alone.decode


def test_jobs_ahead_of_an_isolated_job_still_join() -> None:
    step = schedule([job(1), job(2, isolated=True), job(3)], [], NOW, budget=1000, max_rows=8)
    assert step.admit == [1]


def test_an_isolated_classify_job_runs_alone() -> None:
    step = schedule([job(1, classify=True, isolated=True), job(2)], [], NOW, budget=1000, max_rows=8)
    assert step.classify == [1] and step.admit == [] and not step.decode


def test_classify_runs_between_decode_steps_when_its_peak_fits_beside_the_rows() -> None:
    running = [job(0, 40), job(9, 40)]
    assert schedule([job(1, 30, classify=True)], running, NOW, budget=100, max_rows=8).classify == []
    assert schedule([job(1, 20, classify=True)], running, NOW, budget=100, max_rows=8).classify == [1]


def test_prefill_tokens_per_step_are_capped_long_prompts_go_in_chunks() -> None:
    waiting = [Ticket(i, 30, 1e9, prefill=20) for i in range(1, 5)]
    capped = schedule(waiting, [], NOW, 1000, 8, prefill_tokens=45)
    assert capped.admit == [1, 2, 3] and capped.chunks == [(1, 20), (2, 20), (3, 5)]
    assert capped.decode  # rows 1 and 2 decode after their prefill
    one = schedule(waiting, [], NOW, 1000, 8, prefill_tokens=5)
    assert one.admit == [1] and one.chunks == [(1, 5)] and not one.decode  # nothing decodes yet
    assert schedule(waiting, [], NOW, 1000, 8).chunks == [(i, 20) for i in range(1, 5)]


def test_prefilling_rows_go_on_first_and_decoding_rows_decode_between_their_chunks() -> None:
    running = [job(0), Ticket(1, 100, 1e9, prefill=70)]  # row 1: 70 prompt tokens still to prefill
    waiting = [Ticket(2, 50, 1e9, prefill=40)]
    step = schedule(waiting, running, NOW, 1000, 8, prefill_tokens=32)
    assert step.chunks == [(1, 32)] and step.admit == [] and step.decode  # row 0 decodes meanwhile
    running = [job(0), Ticket(1, 100, 1e9, prefill=6)]
    step = schedule(waiting, running, NOW, 1000, 8, prefill_tokens=32)
    assert step.chunks == [(1, 6), (2, 26)] and step.admit == [2]


def test_a_prefilling_row_holds_its_whole_reservation() -> None:
    running = [Ticket(1, 60, 1e9, prefill=50)]  # barely started: still reserves 60
    step = schedule([Ticket(2, 60, 1e9, prefill=10)], running, NOW, budget=100, max_rows=8, prefill_tokens=64)
    assert step.admit == [] and step.chunks == [(1, 50)] and step.decode


def test_only_a_prefilling_row_means_no_decode_step_until_its_prompt_is_done() -> None:
    step = schedule([], [Ticket(1, 60, 1e9, prefill=50)], NOW, 1000, 8, prefill_tokens=16)
    assert step.chunks == [(1, 16)] and not step.decode and not step.idle


def test_an_isolated_row_goes_on_prefilling_alone() -> None:
    running = [Ticket(1, 60, 1e9, isolated=True, prefill=50)]
    step = schedule([job(2)], running, NOW, 1000, 8, prefill_tokens=16)
    assert step.chunks == [(1, 16)] and step.admit == [] and not step.decode


def scoring(id: int, tokens: int, prompt: int) -> Ticket:
    return Ticket(id, tokens, 1e9, classify=True, prefill=prompt)


def test_classify_jobs_of_one_step_are_budgeted_together_as_one_padded_cache() -> None:
    # Each would fit beside the row alone (40 + 30 <= 100); together they are 2 x (20 + 10) = 60: still
    # fits; a third makes 3 x 30 = 90 beside the row's 40: over, it waits for a later step.
    waiting = [scoring(1, 30, 20), scoring(2, 30, 20), scoring(3, 30, 20)]
    assert schedule(waiting, [job(0, 40)], NOW, budget=100, max_rows=8).classify == [1, 2]
    assert schedule(waiting[2:], [job(0, 40)], NOW, budget=100, max_rows=8).classify == [3]
    # Prompts are padded to the longest and labels to the most: 2 x (45 + 25) = 140, not 50 + 30 = 80.
    assert classify_footprint([scoring(1, 50, 45), scoring(2, 30, 5)]) == 140
    assert schedule([scoring(1, 50, 45), scoring(2, 30, 5)], [], NOW, 100, 8).classify == [1]


def test_classify_jobs_scored_together_never_exceed_the_budget_for_any_mix() -> None:
    sizes = [(30, 20), (12, 2), (55, 50), (9, 8), (40, 10), (22, 21), (60, 1)]
    for budget in range(60, 300, 11):
        for start in range(len(sizes)):
            running = [job(100, 25)] if start % 2 else []
            waiting = [scoring(i, tokens, prompt) for i, (tokens, prompt) in enumerate(sizes[start:])]
            step = schedule(waiting, running, NOW, budget, max_rows=6)
            chosen = [ticket for ticket in waiting if ticket.id in step.classify]
            assert footprint([r.tokens for r in running]) + classify_footprint(chosen) <= budget
            assert classify_footprint(chosen) >= sum(ticket.tokens for ticket in chosen)  # the sum of peaks
            assert step.classify == [t.id for t in waiting if t.id in step.classify]  # arrival order
            fits_alone = [t for t in waiting if t.tokens + footprint([r.tokens for r in running]) <= budget]
            assert not fits_alone or step.classify  # something always runs when one fits alone
