"""Deliberately broken variants of the SQL functions.

Each mutant rewrites one function (text substitution on ``pg_get_functiondef``) or view
(on ``pg_get_viewdef``) to remove one safeguard. ``test_mutants.py`` runs the race test that guards
that safeguard against the mutant and requires it to fail: a race test that
cannot fail proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Mutant:
    function: str  # regprocedure text, or "view " and the view's name
    old: str
    new: str
    killed_by: str  # pytest node id (relative to tests/sql) that must fail
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) replacements in the same function


# retry's first lock: the pipelines of the job and of the dependents it may revive.
RETRY_PRE_LOCK = (
    "PERFORM pgqueue._lock_pipelines(v.pipeline_id || ARRAY(SELECT w.pipeline_id FROM pgqueue.jobs w\n"
    "                                                           WHERE w.id = ANY (v_downstream)\n"
    "                                                             AND pg_current_xact_id_if_assigned() IS NULL));"
)

MUTANTS: dict[str, Mutant] = {
    # claim_next for one queue, or several, through jobs_ready, as for every queue: it reads
    # every due job of other queues ahead of its own.
    "one_queue_claim_walks_jobs_ready": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF cardinality(claim_next.queues) = 1 THEN",
        "IF false THEN",
        "test_indexes.py::test_a_claim_of_its_queues_reads_none_of_another_queues_backlog[one statement-one queue]",
        (
            (
                "AND claim_next.queues IS NULL\n",
                "AND (claim_next.queues IS NULL OR j.queue = ANY (claim_next.queues))\n",
            ),
        ),
    ),
    "several_queues_claim_walks_jobs_ready": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF cardinality(claim_next.queues) > 1 THEN\n            v_full := '{}';",
        "IF false THEN\n            v_full := '{}';",
        "test_indexes.py::test_a_claim_of_its_queues_reads_none_of_another_queues_backlog[one statement-two queues]",
        (
            (
                "AND claim_next.queues IS NULL\n",
                "AND (claim_next.queues IS NULL OR j.queue = ANY (claim_next.queues))\n",
            ),
        ),
    ),
    # A claim of several queues that ends after its first round: a queue with fewer free
    # jobs than its share of the batch leaves the batch short while others have jobs.
    "several_queues_claim_no_fill_up": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "EXIT WHEN v_left = 0 OR v_short = '{}';",
        "EXIT;",
        "test_claim_races.py::test_a_claim_of_several_queues_skips_what_other_claims_hold[one statement]",
    ),
    "several_queues_general_claim_no_fill_up": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "OR (coalesce(v_short, '{}') = '{}'",
        "OR (true",
        "test_claim_races.py::test_a_claim_of_several_queues_skips_what_other_claims_hold[general]",
    ),
    # ... and one that gives up when its first round found nothing free.
    "several_queues_general_claim_gives_up_when_all_held": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF v_ids IS NULL AND v_short <> '{}' THEN",
        "IF false THEN",
        "test_claim_races.py::test_a_claim_of_several_queues_skips_what_other_claims_hold[general]",
    ),
    "several_queues_general_pick_walks_jobs_ready": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF cardinality(claim_next.queues) > 1 THEN\n            -- Several queues: each one's quota",
        "IF false THEN\n            -- Several queues: each one's quota",
        "test_indexes.py::test_a_claim_of_its_queues_reads_none_of_another_queues_backlog[general-two queues]",
        (
            (
                "WHERE claim_next.queues IS NULL\n",
                "WHERE (claim_next.queues IS NULL OR cardinality(claim_next.queues) > 1)"
                " AND (claim_next.queues IS NULL OR j.queue = ANY (claim_next.queues))\n",
            ),
        ),
    ),
    # A round after one that took nothing only tries the limit locks, as if it held one:
    # a claim of several queues comes back empty with a limited queue's places free.
    "several_queues_later_round_only_tries_limits": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF v_ids IS NULL AND v_short <> '{}' THEN\n",
        "IF v_ids IS NULL AND v_short <> '{}' THEN\n                v_holds_limit := true;\n",
        "test_queue_limits.py::test_a_claim_of_several_queues_waits_for_a_limit_lock_it_does_not_hold",
    ),
    # A round after one that claimed rows waiting for a held current row of another scope:
    # it holds the current row it cleared, out of id order, and deadlocks with a retry.
    "round_after_a_claim_waits_for_current_row": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF v_scoped AND (v_holds_limit OR v_try_only OR v_left < batch_size) THEN",
        "IF v_scoped AND (v_holds_limit OR v_try_only) THEN",
        "test_claim_races.py::test_a_round_after_one_that_claimed_never_waits_for_a_current_row",
    ),
    "one_queue_general_pick_walks_jobs_ready": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "WHERE cardinality(claim_next.queues) = 1",
        "WHERE false",
        "test_indexes.py::test_a_claim_of_its_queues_reads_none_of_another_queues_backlog[general-one queue]",
        (
            (
                "WHERE claim_next.queues IS NULL\n",
                "WHERE (claim_next.queues IS NULL OR cardinality(claim_next.queues) = 1)"
                " AND (claim_next.queues IS NULL OR j.queue = ANY (claim_next.queues))\n",
            ),
        ),
    ),
    # retry locking its own row before its dependencies' (the order before the fix): it holds
    # the job while it waits for a dependency another retry holds, which then wants the job.
    "retry_locks_its_row_first": Mutant(
        "pgqueue.retry(bigint)",
        "        GROUP BY x.id\n        ORDER BY x.id\n    LOOP",
        "        GROUP BY x.id\n        ORDER BY x.id DESC\n    LOOP",
        "test_fanin_races.py::test_retries_of_a_job_and_its_dependency_lock_in_id_order",
    ),
    # The scope re-check reading the ready rows' view: planned as a scan of a whole ready index.
    "scope_recheck_scans_a_ready_index": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "FROM pgqueue._scope_turn t WHERE t.id = ANY (v_ids);",
        "FROM pgqueue._claimable t WHERE t.id = ANY (v_ids);",
        "test_indexes.py::test_a_scoped_claim_of_every_queue_never_reads_the_queue_index",
    ),
    # The one-queue picks without their row locks: a second claim takes the job the first holds.
    "one_queue_claim_without_row_lock": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "                LIMIT claim_next.batch_size\n                FOR NO KEY UPDATE OF j SKIP LOCKED\n            )",
        "                LIMIT claim_next.batch_size\n            )",
        "test_claim_races.py::test_a_one_queue_claim_skips_what_another_claim_holds[one statement]",
    ),
    "one_queue_general_pick_without_row_lock": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "                    LIMIT v_left\n                    FOR NO KEY UPDATE OF j SKIP LOCKED) b",
        "                    LIMIT v_left) b",
        "test_claim_races.py::test_a_one_queue_claim_skips_what_another_claim_holds[general]",
    ),
    # The one-queue picks without the paused-queue filter: a job left unflagged is claimed.
    "one_queue_claim_ignores_pause": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "\n                  AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))\n",
        "\n",
        "test_pause.py::test_a_claim_of_one_queue_skips_its_unflagged_paused_jobs[one statement]",
    ),
    "one_queue_general_pick_ignores_pause": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "                      AND j.run_after <= now()\n"
        "                      AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))\n",
        "                      AND j.run_after <= now()\n",
        "test_pause.py::test_a_claim_of_one_queue_skips_its_unflagged_paused_jobs[general]",
    ),
    # abort without its row lock: a failure under way requeues the job, and the request
    # recorded beside it is read by nobody (the job runs again, not aborted).
    "abort_without_row_lock": Mutant(
        "pgqueue.abort(bigint)",
        "WHERE j.id = abort.job_id FOR SHARE;",
        "WHERE j.id = abort.job_id;",
        "test_abort.py::test_a_failure_waits_for_an_abort_under_way_and_reads_its_request",
    ),
    # abort that gives up on a job requeued while it looked, instead of cancelling it.
    "abort_gives_up_on_a_requeued_job": Mutant(
        "pgqueue.abort(bigint)",
        "-- Queued or waiting again (requeued after cancel looked): cancel it now.",
        "RETURN NULL;",
        "test_abort.py::test_an_abort_waits_for_a_failure_under_way_and_cancels_the_requeued_job",
    ),
    # A queue leaving paused_queues (resume_queue's DELETE, or a hand one) cleared its jobs'
    # flags without the pause lock: it does not wait for an enqueue under way that flags
    # its jobs, misses them, and they stay out of the claim index for good. (resume_queue
    # takes the lock before its DELETE as well, so the hand DELETE is the case that shows it.)
    "unpause_without_pause_lock": Mutant(
        "pgqueue._paused_queues_removed()",
        "PERFORM pgqueue._lock_pause(v_queues);",
        "NULL;",
        "test_pause.py::test_a_resume_waits_for_an_enqueue_that_flagged_jobs_and_clears_them[delete]",
    ),
    # _hold_paused waiting for the queue's lock instead of trying it: a transaction holding a
    # row that a resume (holding the lock) waits for deadlocks with it.
    "hold_paused_waits": Mutant(
        "pgqueue._hold_paused(text[])",
        "WHERE pg_try_advisory_xact_lock_shared(pgqueue._lock_class('pause'), hashtext(x.queue)));",
        "WHERE pg_advisory_xact_lock_shared(pgqueue._lock_class('pause'), hashtext(x.queue)) IS NOT NULL);",
        "test_pause.py::test_a_resume_waiting_for_a_row_never_deadlocks_with_its_holder",
    ),
    # pause_queue waiting for the rows others hold: holding those it flagged, it deadlocks with
    # a completion (or cancel_pipeline) holding one and locking another.
    "pause_waits_for_rows": Mutant(
        "pgqueue.pause_queue(text)",
        "ORDER BY o.id FOR NO KEY UPDATE SKIP LOCKED))",
        "ORDER BY o.id FOR NO KEY UPDATE))",
        "test_pause.py::test_a_pause_skips_the_rows_others_hold_and_waits_for_none",
    ),
    # enqueue_periodic that moves the schedule to any tick, not only a later one: every
    # racer for a tick enqueues it once the first commits.
    "periodic_any_tick": Mutant(
        "pgqueue.enqueue_periodic(text,timestamp with time zone,jsonb)",
        "WHERE p.last_tick < EXCLUDED.last_tick",
        "",
        "test_periodic_ticks.py::test_racers_for_one_tick_wait_and_exactly_one_enqueues",
    ),
    # save_progress without its fence: a worker whose lease was recovered overwrites the
    # checkpoint of the attempt that took the job over.
    "save_progress_unfenced": Mutant(
        "pgqueue.save_progress(bigint,text,jsonb)",
        "AND j.state = 'running' AND j.locked_by = save_progress.worker",
        "",
        "test_semantics.py::test_save_progress_is_fenced_and_read_back_by_the_next_attempt",
    ),
    # heartbeat waiting for every row lock: one locked job holds up all the worker's leases.
    "heartbeat_waits": Mutant(
        "pgqueue.heartbeat(text)",
        "FOR NO KEY UPDATE SKIP LOCKED",
        "FOR NO KEY UPDATE",
        "test_recovery_races.py::test_heartbeat_skips_a_job_locked_elsewhere_instead_of_waiting",
    ),
    # claim by id without the conditional state check: every claimer wins.
    "claim_unconditional": Mutant(
        "pgqueue.claim(bigint,text)",
        "WHERE j.id = claim.job_id AND j.state = 'queued' AND j.run_after <= now()\n    RETURNING",
        "WHERE j.id = claim.job_id\n    RETURNING",
        "test_claim_races.py::test_n_sessions_claim_one_id_exactly_one_wins",
    ),
    # claim by id without the scope lock: the E4 trap (23505 or a second runner).
    "claim_no_scope_lock": Mutant(
        "pgqueue.claim(bigint,text)",
        "PERFORM pg_advisory_xact_lock(pgqueue._lock_class('scope'), pgqueue._scope_lock_key(v_scope));",
        "NULL;",
        "test_claim_races.py::test_claim_by_id_of_newer_scope_job_waits_then_gets_nothing",
    ),
    # claim_next without the per-scope head check.
    "claim_next_ignores_scope": Mutant(
        "view pgqueue._scope_turn",
        # PostgreSQL 16 prints the column unqualified ("(scope IS NULL)"), 15 as "(j.scope IS NULL)".
        "scope IS NULL) OR",
        "scope IS NULL OR true) OR",
        "test_claim_races.py::test_concurrent_claims_across_one_scope_oldest_first_one_winner",
    ),
    # fan-in counter read from the statement's snapshot without locking the dependents
    # first: the later of two concurrent completions overwrites the earlier decrement.
    "unblock_without_lock": Mutant(
        "pgqueue._unblock_dependents(bigint[])",
        "w.state = 'waiting'\n                        FOR NO KEY UPDATE) w;",
        "w.state = 'waiting') w;",
        "test_fanin_races.py::test_two_parents_finishing_concurrently_queue_the_join_once",
        more=(
            (
                "SET pending_deps = w.pending_deps - u.n,\n"
                "           state = CASE WHEN w.pending_deps = u.n THEN",
                "SET pending_deps = (SELECT s.pending_deps FROM pgqueue.jobs s WHERE s.id = w.id) - u.n,\n"
                "           state = CASE WHEN (SELECT s.pending_deps FROM pgqueue.jobs s WHERE s.id = w.id) = u.n THEN",
            ),
        ),
    ),
    # fan-in counter decremented once per completion batch instead of once per settled edge.
    "fanin_counter_per_batch": Mutant(
        "pgqueue._unblock_dependents(bigint[])",
        "SET pending_deps = w.pending_deps - u.n,\n           state = CASE WHEN w.pending_deps = u.n THEN",
        "SET pending_deps = w.pending_deps - 1,\n           state = CASE WHEN w.pending_deps = 1 THEN",
        "test_fanin_races.py::test_counter_loses_no_decrement_when_completions_race",
    ),
    # retry makes cancelled dependents wait again with their stale counter.
    "retry_keeps_stale_counter": Mutant(
        "pgqueue.retry(bigint)",
        "pending_deps = pgqueue._unfinished_deps(j.id)",
        "pending_deps = j.pending_deps + 0 * pgqueue._unfinished_deps(j.id)",
        "test_fanin_races.py::test_retry_of_failed_dependency_recounts_the_join",
    ),
    # retry recounts without share-locking the dependencies: one finishing concurrently is
    # counted as unfinished, and its completion (which saw the job cancelled) never decrements it.
    "retry_without_share_lock": Mutant(
        "pgqueue.retry(bigint)",
        "PERFORM 1 FROM pgqueue.jobs j WHERE j.id = v_id FOR SHARE;",
        "PERFORM 1 FROM pgqueue.jobs j WHERE j.id = v_id;",
        "test_fanin_races.py::test_retry_racing_completion_of_another_dependency_counts_it",
    ),
    # a dependency recorded without FOR SHARE on the parent: its completion misses the new child.
    "depends_on_without_share_lock": Mutant(
        "pgqueue._lock_dependencies(bigint[],text)",
        "WHERE j.id = want.id FOR SHARE",
        "WHERE j.id = want.id",
        "test_fanin_races.py::test_dependency_added_while_parent_completes_is_not_missed",
    ),
    # requeue without the dedup-key lock: 23505 against a concurrent enqueue.
    "requeue_without_dedup_lock": Mutant(
        "pgqueue._lock_before_row(bigint,text)",
        "PERFORM pgqueue._lock_dedup_key(v_key);",
        "NULL;",
        "test_dedup_races.py::test_requeue_racing_enqueue_of_same_key",
    ),
    # stale recovery without the key's try-lock: it requeues a job while its key is enqueued.
    "recover_without_key_try_lock": Mutant(
        "pgqueue.recover_stale(interval)",
        "CONTINUE WHEN c.dedup_key IS NOT NULL AND NOT",
        "CONTINUE WHEN false AND NOT",
        "test_dedup_races.py::test_recover_stale_leaves_a_job_whose_key_is_being_enqueued_for_the_next_round",
    ),
    # cancel_pipeline locking its members in heap order: a cycle with a completion.
    "cancel_pipeline_in_heap_order": Mutant(
        "pgqueue.cancel_pipeline(uuid)",
        "FROM (SELECT x.id FROM downstream x ORDER BY x.id) x",
        "FROM (SELECT x.id FROM downstream x ORDER BY x.id DESC) x",
        "test_pipelines.py::test_cancel_pipeline_locks_its_members_in_id_order",
    ),
    # complete without the lease-holder fence: a recovered worker overwrites.
    "complete_without_fence": Mutant(
        "pgqueue._complete(text,bigint[],jsonb[],jsonb[],text)",
        "AND j.state = 'running' AND j.locked_by = p_worker",
        "AND j.state IN ('running', 'queued')",
        "test_recovery_races.py::test_recover_first_then_late_complete_is_fenced",
    ),
    # notify for every inserted row's queue, waiting or not.
    "notify_waiting_jobs": Mutant(
        "pgqueue._notify_inserted()",
        "WHERE n.state = 'queued'",
        "WHERE true",
        "test_notify.py::test_silent_for_zero_rows_waiting_jobs_and_claims",
    ),
    # retention waiting for rows other transactions hold: it deadlocked with retries and
    # enqueues that lock rows in another order, and they queued behind its batch.
    "prune_expired_waits": Mutant(
        "pgqueue.prune_expired(integer)",
        "FOR UPDATE SKIP LOCKED))",
        "FOR UPDATE))",
        "test_retention.py::test_it_never_waits_for_a_row_another_transaction_holds",
    ),
    # retention and prune deleting a failed job that a retried dependent waits for again:
    # the dependent's pending_deps counts it for good.
    "prune_expired_drops_awaited_jobs": Mutant(
        "pgqueue.prune_expired(integer)",
        "AND (o.state = 'succeeded' OR NOT pgqueue._depended_on(o.id))",
        "",
        "test_retention.py::test_a_failed_job_a_retried_dependent_waits_for_is_kept",
    ),
    "prune_drops_awaited_jobs": Mutant(
        "pgqueue.prune(interval)",
        "AND (j.state = 'succeeded' OR NOT pgqueue._depended_on(j.id))",
        "",
        "test_retention.py::test_a_failed_job_a_retried_dependent_waits_for_is_kept",
        (("AND (o.state = 'succeeded' OR NOT pgqueue._depended_on(o.id))", ""),),
    ),
    # prune() leaving the failed dependencies of the jobs it deleted to its next call (a chain
    # that failed at its root took a call per link).
    "prune_stops_after_its_first_statement": Mutant(
        "pgqueue.prune(interval)",
        "WHILE cardinality(v_next) > 0 LOOP",
        "WHILE false LOOP",
        "test_retention.py::test_a_failed_job_goes_after_the_last_job_depending_on_it",
    ),
    # ... and following them without asking whether another job still depends on them.
    "prune_follow_up_drops_awaited_jobs": Mutant(
        "pgqueue.prune(interval)",
        "AND NOT f.is_current\n                                      AND NOT pgqueue._depended_on(f.id)",
        "AND NOT f.is_current",
        "test_retention.py::test_a_failed_job_goes_after_the_last_job_depending_on_it",
    ),
    # ... and waiting for a job a retry holds while the retry waits for a row prune deleted.
    "prune_follow_up_waits": Mutant(
        "pgqueue.prune(interval)",
        "FOR UPDATE SKIP LOCKED))",
        "FOR UPDATE))",
        "test_retention.py::test_prune_following_a_chain_never_waits_for_a_retry[dependent]",
    ),
    # Deleting a dependency that never succeeded leaves what waits for it waiting for good.
    "delete_strands_dependents": Mutant(
        "pgqueue._drop_edges()",
        "IF cardinality(v_unsucceeded) > 0 THEN",
        "IF false THEN",
        "test_retention.py::test_deleting_a_job_that_had_not_succeeded_cancels_what_waits_for_it",
    ),
    # A cancellation reading its downstream once, before the locks it waits for: a dependent
    # enqueued meanwhile waits for a cancelled job for good.
    "cancel_dependents_reads_downstream_once": Mutant(
        "pgqueue._cancel_dependents(bigint[],text)",
        "        v_causes := v_causes || v_new_causes;\n    END LOOP;",
        "        v_causes := v_causes || v_new_causes;\n        EXIT;\n    END LOOP;",
        "test_fanin_races.py::"
        "test_a_dependent_enqueued_while_a_failure_cancels_its_dependency_is_cancelled_too",
    ),
    # claims leave is_current alone: the property test's invariant catches nothing? It must.
    "claim_next_keeps_old_current": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "UPDATE pgqueue.jobs o SET is_current = false",
        "UPDATE pgqueue.jobs o SET is_current = o.is_current",
        "test_properties.py::test_random_interleavings_keep_the_invariants",
    ),
    # cancel_pipeline leaves the jobs outside the pipeline that wait on its members waiting
    # for good.
    "cancel_pipeline_keeps_outside_dependents": Mutant(
        "pgqueue.cancel_pipeline(uuid)",
        "    IF v_ids IS NOT NULL THEN\n        PERFORM pgqueue._cancel_dependents",
        "    IF false THEN\n        PERFORM pgqueue._cancel_dependents",
        "test_pipelines.py::test_cancel_pipeline_locks_outside_dependents_of_all_members_in_id_order",
    ),
    # cancel_pipeline cancels a scope's next job and unblocks none after it: the scope stalls.
    "cancel_pipeline_stalls_scopes": Mutant(
        "pgqueue.cancel_pipeline(uuid)",
        "    IF v_cancelled_scopes IS NOT NULL THEN",
        "    IF false THEN",
        "test_pipelines.py::test_cancel_pipeline_lets_the_next_job_of_a_scope_it_empties_run",
    ),
    # when_waiting producers without the shared 'waiters' lock: a worker registering right
    # after the producer decided nobody waits claims before the job commits, and sleeps.
    "notify_gate_without_lock": Mutant(
        "pgqueue._someone_waits(text[])",
        "    IF current_setting('transaction_isolation') <> 'read committed'\n"
        "       OR NOT pg_try_advisory_xact_lock_shared(pgqueue._lock_class('waiters'), 0) THEN\n"
        "        RETURN true;\n    END IF;",
        "NULL;",
        "test_notify_when_waiting.py::test_sleeping_worker_waits_for_a_silent_producer_and_claims_its_job",
    ),
    # when_waiting producers reading the waiters under a snapshot older than the lock (above
    # READ COMMITTED): a registration committed since is not seen, and its worker sleeps on.
    "notify_gate_ignores_isolation": Mutant(
        "pgqueue._someone_waits(text[])",
        "    IF current_setting('transaction_isolation') <> 'read committed'\n"
        "       OR NOT pg_try_advisory_xact_lock_shared",
        "    IF NOT pg_try_advisory_xact_lock_shared",
        "test_notify_when_waiting.py::test_a_repeatable_read_producer_notifies_a_worker_registered_after_its_snapshot",
    ),
    # when_waiting producers waiting for the 'waiters' lock instead of trying it: one holding
    # a scope's order lock from an earlier call closes a cycle with a registering worker and
    # a completion of that scope.
    "notify_gate_waits": Mutant(
        "pgqueue._someone_waits(text[])",
        "    IF current_setting('transaction_isolation') <> 'read committed'\n"
        "       OR NOT pg_try_advisory_xact_lock_shared(pgqueue._lock_class('waiters'), 0) THEN\n"
        "        RETURN true;\n    END IF;",
        "PERFORM pg_advisory_xact_lock_shared(pgqueue._lock_class('waiters'), 0);",
        "test_notify_when_waiting.py::test_a_producer_holding_a_scope_lock_and_a_registering_worker_do_not_deadlock",
    ),
    # a worker registering without the exclusive lock: same lost wake-up, other side.
    "claim_or_wait_without_lock": Mutant(
        "pgqueue.claim_or_wait(text,text[],integer)",
        "PERFORM pg_advisory_xact_lock(pgqueue._lock_class('waiters'), 0);",
        "NULL;",
        "test_notify_when_waiting.py::test_producer_meeting_a_registering_worker_notifies_without_waiting",
    ),
    # scoped enqueue without the shared order lock: a completion committing between its
    # look at the scope and its commit unblocks nothing, and the new job stays blocked.
    "enqueue_without_scope_order_lock": Mutant(
        "pgqueue.enqueue(text,jsonb,text,jsonb,text,timestamp with time zone,integer,integer,uuid,jsonb,bigint[])",
        "v_unlocked := pgqueue._share_scope_order(ARRAY[enqueue.scope]);",
        "v_unlocked := '{}';",
        "test_scope_heads.py::test_enqueue_in_flight_makes_the_completion_wait_and_its_job_runs_next",
    ),
    # completion without the exclusive order lock: same lost unblocking, other side.
    "complete_without_scope_order_lock": Mutant(
        "pgqueue._complete(text,bigint[],jsonb[],jsonb[],text)",
        "PERFORM pgqueue._lock_scope_order(v_scopes);",
        "NULL;",
        "test_scope_heads.py::test_completion_in_flight_makes_the_enqueue_wait_and_see_the_scope_free",
    ),
    # a completion that reads the pipelines of its stored children after its rows: it holds
    # the member's row while it waits for the pipeline, which an enqueue depending on the
    # member holds while it waits for the row.
    "complete_locks_stored_childrens_pipeline_late": Mutant(
        "pgqueue._complete(text,bigint[],jsonb[],jsonb[],text)",
        "       AND j.id = ANY (p_job_ids);\n    v_given",
        "       AND false;\n    v_given",
        "test_pipelines.py::test_completion_creating_children_takes_the_pipeline_lock_before_its_rows[stored-complete_many]",
    ),
    # the same for the children's dedup keys: an enqueue of the key that depends on the
    # member holds the key's lock, then share-locks the member.
    "complete_locks_childrens_keys_late": Mutant(
        "pgqueue._complete(text,bigint[],jsonb[],jsonb[],text)",
        "PERFORM pgqueue._lock_dedup_keys(v_keys);",
        "NULL;",
        "test_pipelines.py::test_completion_creating_keyed_children_takes_their_keys_before_its_rows[given]",
    ),
    # the same for the children given to the call.
    "complete_locks_given_childrens_pipeline_late": Mutant(
        "pgqueue._complete(text,bigint[],jsonb[],jsonb[],text)",
        "WHERE j.id = ANY (v_given) AND j.state = 'running'",
        "WHERE false",
        "test_pipelines.py::test_completion_creating_children_takes_the_pipeline_lock_before_its_rows[given-complete]",
    ),
    # enqueue merging into a pending job by the INSERT's ON CONFLICT DO UPDATE (a lock for
    # update) instead of FOR SHARE: two enqueues each merging into the other's dependency,
    # which each holds shared, deadlock.
    "enqueue_merges_for_update": Mutant(
        "pgqueue._merge_target(text)",
        "BEGIN\n    SELECT j.id INTO v_id FROM pgqueue.jobs j",
        "BEGIN\n    RETURN NULL;\n    SELECT j.id INTO v_id FROM pgqueue.jobs j",
        "test_dedup_races.py::test_enqueues_merging_into_each_others_dependency_take_turns[enqueue]",
    ),
    # enqueue merging into a pending job and locking its dependencies as well: it holds that
    # job (a waiting dependent a batch completion is about to queue) while it waits for a
    # dependency the completion holds.
    "enqueue_merge_locks_its_dependencies": Mutant(
        "pgqueue.enqueue(text,jsonb,text,jsonb,text,timestamp with time zone,integer,integer,uuid,jsonb,bigint[])",
        "PERFORM pgqueue._check_dependencies(v_deps, 'pgqueue.enqueue');",
        "PERFORM pgqueue._lock_dependencies(v_deps, 'pgqueue.enqueue');",
        "test_dedup_races.py::test_an_enqueue_merging_into_a_waiting_dependent_takes_none_of_its_dependencies",
    ),
    # enqueue share-locking its dependencies before it looks for the job its key merges into
    # (the order until session 25): it holds a dependency while it waits for that job, which
    # a transition locks first, then the dependency.
    "enqueue_locks_dependencies_before_merging": Mutant(
        "pgqueue.enqueue(text,jsonb,text,jsonb,text,timestamp with time zone,integer,integer,uuid,jsonb,bigint[])",
        "        PERFORM pgqueue._lock_dedup_key(enqueue.dedup_key);\n",
        "        PERFORM pgqueue._lock_dedup_key(enqueue.dedup_key);\n"
        "        IF cardinality(v_deps) > 0 THEN\n"
        "            PERFORM pgqueue._lock_dependencies(v_deps, 'pgqueue.enqueue');\n"
        "        END IF;\n",
        "test_dedup_races.py::test_an_enqueue_merging_into_an_older_job_a_transition_takes_with_its_dependency[complete]",
    ),
    # the merge lookup waiting for a held job outside a subtransaction: a job that left
    # pending meanwhile stays locked (not returned), and the enqueue holds it while it
    # waits for its dependencies.
    "merge_target_keeps_the_lock_of_a_job_gone": Mutant(
        "pgqueue._merge_target(text)",
        "    IF FOUND OR NOT EXISTS (SELECT 1 FROM pgqueue.jobs j",
        "    SELECT j.id INTO v_id FROM pgqueue.jobs j\n"
        "    WHERE j.dedup_key = p_key AND j.state IN ('waiting', 'queued') FOR SHARE;\n"
        "    RETURN v_id;\n"
        "    IF FOUND OR NOT EXISTS (SELECT 1 FROM pgqueue.jobs j",
        "test_dedup_races.py::test_a_merge_target_that_leaves_pending_while_the_enqueue_waits_is_let_go",
    ),
    "enqueue_many_merges_for_update": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "                  AND j.state IN ('waiting', 'queued')\n                ORDER BY j.id FOR SHARE) h;",
        "                  AND false) h;",
        "test_dedup_races.py::test_enqueues_merging_into_each_others_dependency_take_turns[enqueue_many]",
    ),
    # an enqueue that never waits for a scope's order lock another call of its transaction
    # could cross: the application's enqueue deadlocked with a batch completion.
    "share_scope_order_always_waits": Mutant(
        "pgqueue._share_scope_order(jsonb[])",
        "IF EXISTS (SELECT 1 FROM pg_locks l",
        "IF false AND EXISTS (SELECT 1 FROM pg_locks l",
        "test_scope_heads.py::test_an_application_enqueueing_two_scopes_in_turn_never_deadlocks_a_completion[enqueue]",
    ),
    # an enqueue that skips a busy scope's lock whenever it holds another one (not only a
    # later one).
    "share_scope_order_skips_after_any_lock": Mutant(
        "pgqueue._share_scope_order(jsonb[])",
        "         > v_key) THEN",
        "         <> v_key) THEN",
        "test_scope_heads.py::test_holding_an_earlier_scopes_order_lock_an_enqueue_waits_for_a_waiting_transition",
    ),
    # a transition that forgets to unblock the scope's next job.
    "fail_keeps_next_blocked": Mutant(
        "pgqueue._fail(bigint,text,text,interval)",
        "IF v_scope IS NOT NULL AND v_state <> 'queued' THEN",
        "IF false THEN",
        "test_scope_heads.py::test_every_transition_that_frees_the_scope_unblocks_the_next",
    ),
    # enqueue blocking behind a running job that is newer than the new job (possible when
    # the id was drawn before that job's and the insert ran after its claim): the
    # running job's end unblocks only jobs after it, so this one would never run.
    "enqueue_blocks_behind_newer_running": Mutant(
        "pgqueue._behind_older(jsonb,bigint)",
        "AND o.id < p_job_id",
        "AND (o.id < p_job_id OR o.state = 'running')",
        "test_scope_heads.py::test_a_job_older_than_the_running_one_enters_unblocked",
    ),
    # claim_next without the limit lock: the count is taken in a snapshot that may predate a
    # claim under way, and two claimers both take the last place.
    "limit_unlocked": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "THEN pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(y.queue)) IS NOT NULL",
        "THEN true",
        "test_queue_limits.py::test_two_claimers_never_both_take_the_last_place",
    ),
    # claim() without the limit: a claim by id takes a job of a full queue.
    "claim_by_id_ignores_the_limit": Mutant(
        "pgqueue.claim(bigint,text)",
        "IF NOT pgqueue._limit_room(v_queue) THEN",
        "IF false THEN",
        "test_queue_limits.py::test_a_claim_by_id_waits_for_a_claim_under_way_and_then_counts_it",
    ),
    # later rounds waiting for limit locks out of key order: a claim holding the lock of a
    # queue it met later makes this one wait (and two such claims could deadlock).
    "limit_later_rounds_wait": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "ELSE pg_try_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(y.queue)) END AS got",
        "ELSE pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(y.queue)) IS NOT NULL END AS got",
        "test_queue_limits.py::test_a_later_round_never_waits_for_a_limit_lock",
    ),
    # one round only: a batch that met a full queue's jobs first comes back short, and the
    # worker sleeps while jobs of other queues are due.
    "limit_one_round": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "AND (v_filled = '{}' OR cardinality(v_picked)",
        "AND (true OR cardinality(v_picked)",
        "test_queue_limits.py::test_a_batch_takes_a_limited_queues_free_places_and_fills_up_elsewhere[every queue]",
    ),
    "limit_one_round_of_several_queues": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "AND (v_filled = '{}' OR cardinality(v_picked)",
        "AND (true OR cardinality(v_picked)",
        "test_queue_limits.py::test_a_batch_takes_a_limited_queues_free_places_and_fills_up_elsewhere[two queues]",
    ),
    # a place freed by a failure announced to nobody.
    "fail_frees_a_place_silently": Mutant(
        "pgqueue._fail(bigint,text,text,interval)",
        "IF v_state <> 'queued' THEN\n        PERFORM pgqueue._notify_limited(ARRAY[p_job_id]);",
        "IF false THEN\n        PERFORM pgqueue._notify_limited(ARRAY[p_job_id]);",
        "test_queue_limits.py::test_every_end_of_a_running_job_of_a_limited_queue_wakes_it",
    ),
    # the count taken from a REPEATABLE READ snapshot, which may predate another claim.
    "limit_counts_in_repeatable_read": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN\n"
        "            v_full := v_limited;",
        "IF false THEN\n            v_full := v_limited;",
        "test_queue_limits.py::test_under_repeatable_read_no_limited_job_is_claimed",
    ),
    # claim_or_wait waiting for limit locks while it holds the 'waiters' lock: every enqueue
    # waits behind it, and a transaction that claimed and then completes deadlocks with it.
    "claim_or_wait_waits_for_limit_locks": Mutant(
        "pgqueue.claim_or_wait(text,text[],integer)",
        "PERFORM set_config('pgqueue.claim_waits', 'never', true);",
        "NULL;",
        "test_queue_limits.py::test_claim_or_wait_never_waits_for_a_limit_lock",
    ),
    # claim() clearing the previous current job after the limit lock, with no row lock
    # before it: it waits, holding the lock, for a claim queued up behind it (deadlock).
    "claim_locks_current_after_limit": Mutant(
        "pgqueue.claim(bigint,text)",
        "PERFORM 1 FROM pgqueue.jobs o WHERE o.is_current AND pgqueue._same_scope(o.scope, v_scope)\n"
        "            FOR NO KEY UPDATE;",
        "NULL;",
        "test_queue_limits.py::test_a_claim_locks_the_rows_it_writes_before_the_limit_lock",
    ),
    # a queue skipped for a busy limit lock, not announced: its jobs wait for a poll.
    "busy_limited_queue_silent": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "PERFORM pg_notify('pgqueue', q) FROM unnest(v_busy) q;",
        "NULL;",
        "test_queue_limits.py::test_a_later_round_never_waits_for_a_limit_lock",
    ),
    # claim_or_wait resetting the try-only mode on its way out while the 'waiters' lock it
    # took lasts to commit: a later claim in the transaction waits for a limit lock.
    "claim_or_wait_resets_try_only": Mutant(
        "pgqueue.claim_or_wait(text,text[],integer)",
        "RETURN QUERY SELECT * FROM pgqueue.claim_next(claim_or_wait.worker, claim_or_wait.queues, "
        "claim_or_wait.batch_size);",
        "RETURN QUERY SELECT * FROM pgqueue.claim_next(claim_or_wait.worker, claim_or_wait.queues, "
        "claim_or_wait.batch_size); PERFORM set_config('pgqueue.claim_waits', '', true);",
        "test_queue_limits.py::test_after_claim_or_wait_a_transactions_claims_only_try_limit_locks",
    ),
    # later rounds waiting for a previous current row while they hold a limit lock.
    "later_round_waits_for_current_row": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF v_scoped AND (v_holds_limit OR v_try_only OR v_left < batch_size) THEN",
        "IF v_scoped AND v_try_only THEN",
        "test_queue_limits.py::test_a_later_round_skips_a_scope_whose_current_row_is_held",
    ),
    # set_queue_limit without the queue's lock: a concurrent change reads no limit and
    # announces nothing though it raised one.
    "limit_change_unlocked": Mutant(
        "pgqueue.set_queue_limit(text,integer)",
        "PERFORM pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(set_queue_limit.queue));",
        "NULL;",
        "test_queue_limits.py::test_two_limit_changes_take_turns",
    ),
    # claim_or_wait waiting, under the 'waiters' lock, for a scope's current row another
    # transaction holds: every enqueue waits behind it (and it deadlocks with the holder).
    "claim_or_wait_waits_for_current_row": Mutant(
        "pgqueue.claim_next(text,text[],integer)",
        "IF v_scoped AND (v_holds_limit OR v_try_only OR v_left < batch_size) THEN",
        "IF v_scoped AND (v_holds_limit OR v_left < batch_size) THEN",
        "test_queue_limits.py::test_claim_or_wait_skips_a_scope_whose_current_row_is_held",
    ),
    # set_queue_limit leaving _any_queue_limit as it was: claims keep their one-statement
    # path, which knows no limits.
    "any_queue_limit_never_set": Mutant(
        "pgqueue._set_any_queue_limit()",
        "IF v_any IS DISTINCT FROM pgqueue._any_queue_limit() THEN",
        "IF false THEN",
        "test_queue_limits.py::test_a_limit_set_elsewhere_binds_a_session_that_claimed_before",
    ),
    # Stored specs whose dependencies are never checked when they are stored: the mistake
    # surfaces at the parent's completion, which raises every time.
    "stored_dependencies_unchecked": Mutant(
        "pgqueue.enqueue(text,jsonb,text,jsonb,text,timestamp with time zone,integer,integer,uuid,jsonb,bigint[])",
        "PERFORM pgqueue._check_stored_dependencies(enqueue.next_jobs, 'pgqueue.enqueue: next_jobs');",
        "NULL;",
        "test_semantics.py::test_a_stored_spec_naming_an_unknown_job_is_refused_when_stored[SELECT pgqueue.enqueue('p', next_jobs => $1::jsonb)-pgqueue.enqueue: next_jobs[1]: next_jobs[0]]",
    ),
    # A completion that treats the parent's stored specs like passed ones: a dependency
    # that ended meanwhile refuses the parent's success, every time.
    "stored_spec_dependency_refuses_success": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "IF v_dep_ids IS NOT NULL AND p_stored > 0 THEN",
        "IF false THEN",
        "test_semantics.py::test_a_stored_specs_dependency_that_ended_cancels_the_child_not_the_success[cancelled]",
    ),
    # A child created cancelled whose "after" siblings are left waiting for it.
    "cancelled_child_strands_siblings": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "PERFORM pgqueue._cancel_dependents(v_doomed, 'was cancelled');",
        "NULL;",
        "test_semantics.py::test_a_stored_specs_dependency_that_ended_cancels_the_child_not_the_success[failed]",
    ),
    # An edge to a dependency that is gone (pruned): inert, but counted as pending.
    "edge_to_pruned_dependency": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "AND (v_gone IS NULL OR dep.id <> ALL (v_gone))",
        "AND true",
        "test_semantics.py::test_a_stored_specs_dependency_that_ended_cancels_the_child_not_the_success[pruned]",
    ),
    # A child's own stored specs checked again when the child is created: a dependency
    # pruned since makes the parent's completion raise, every time.
    "stored_specs_checked_again": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "AND e.ord > p_stored;",
        ";",
        "test_semantics.py::test_a_grandchilds_dependency_pruned_meanwhile_refuses_nothing",
    ),
    # A doomed spec keeping a key nobody holds: it takes in a later spec of its array.
    "doomed_spec_keeps_its_key": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "THEN sp.s - 'dedup_key' ELSE sp.s END",
        "THEN sp.s ELSE sp.s END",
        "test_semantics.py::test_a_stored_spec_with_an_ended_dependency_gives_up_a_key_nobody_holds",
    ),
    # Only the doomed specs give their keys up, not what waits on them through "after".
    "after_chain_keeps_its_key": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "AND sp.s->'after' ? dm.k",
        "AND false",
        "test_semantics.py::test_specs_cancelled_at_creation_take_part_in_no_coalescing",
    ),
    # A stored spec's child written with no edge to the dependency that failed (session
    # 20's design): a retry of that dependency does not revive it.
    "stored_child_without_edge_to_failed_dependency": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "AND (v_gone IS NULL OR dep.id <> ALL (v_gone))",
        "AND (v_dead IS NULL OR dep.id <> ALL (v_dead))",
        "test_semantics.py::test_a_retry_of_the_stored_dependency_revives_the_child",
    ),
    # A prune that waited for the completion creating a cancelled dependent deletes the job
    # and its new edge; named "dependency failed", a retry of another dependency revives it.
    "deleted_dependency_keeps_the_revivable_name": Mutant(
        "pgqueue._drop_edges()",
        "AND (j.last_error LIKE 'dependency failed: %' OR j.last_error = 'pipeline cancelled');",
        "AND false;",
        "test_fanin_races.py::test_a_child_of_an_ended_dependency_created_during_its_retry_or_prune_never_runs_without_it[prune]",
    ),
    # Specs merged by dedup_key not seen as one node: the first waits for itself.
    "merged_specs_not_checked_for_cycles": Mutant(
        "pgqueue._check_specs(jsonb,text,boolean,integer)",
        "IF v_chained OR v_merging THEN",
        "IF v_chained THEN",
        "test_semantics.py::test_specs_merged_by_dedup_key_waiting_on_each_other_are_a_cycle",
    ),
    # cancel() keeping a dependency's "dependency failed" text: retry revives by it.
    "cancel_keeps_dependency_failed": Mutant(
        "pgqueue.cancel(bigint)",
        "OR j.last_error LIKE 'dependency failed: %'",
        "",
        "test_semantics.py::test_a_job_cancelled_by_hand_is_not_revived_by_a_retry_of_its_dependency[retried itself]",
    ),
    # A retry of a member lifting the pipeline's mark only: what waits on it stays cancelled.
    "retry_does_not_resume_the_pipeline": Mutant(
        "pgqueue._revivable(pgqueue.jobs,uuid)",
        " OR w.last_error = 'pipeline cancelled')",
        ")",
        "test_semantics.py::test_a_retry_of_a_member_resumes_a_cancelled_pipeline_downstream_of_it",
    ),
    # Reviving a job of another pipeline that is still cancelled.
    "retry_revives_into_a_cancelled_pipeline": Mutant(
        "pgqueue._revivable(pgqueue.jobs,uuid)",
        "OR NOT EXISTS (SELECT 1 FROM pgqueue.cancelled_pipelines c",
        "OR true OR NOT EXISTS (SELECT 1 FROM pgqueue.cancelled_pipelines c",
        "test_semantics.py::test_a_retry_revives_no_job_of_another_pipeline_still_cancelled",
    ),
    # The cycle check on the merged graph only: a spec's own edges, written when a stored
    # spec's ended dependency undoes the merge, are not checked.
    "cycle_check_merged_graph_only": Mutant(
        "pgqueue._check_after_cycles(jsonb,text)",
        "(VALUES (d.pos), (CASE WHEN w.job = w.pos THEN d.job END))",
        "(VALUES (CASE WHEN w.job = w.pos THEN d.job END))",
        "test_semantics.py::test_a_cycle_of_specs_that_only_merging_would_hide_is_refused",
    ),
    # A retry not reading its downstream again once its locks are held.
    "retry_reads_downstream_once": Mutant(
        "pgqueue.retry(bigint)",
        "IF cardinality(v_more) > 0 THEN",
        "IF false THEN",
        "test_fanin_races.py::test_a_child_of_an_ended_dependency_created_during_its_retry_or_prune_never_runs_without_it[retry]",
    ),
    # One key namespace for a parent's stored and passed specs.
    "stored_and_passed_keys_shared": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "IF p_stored > 0 AND jsonb_array_length(p_specs) > p_stored AND p_specs @? '$[*].key' THEN",
        "IF false THEN",
        "test_semantics.py::test_stored_and_passed_specs_have_keys_of_their_own",
    ),
    # A hand DELETE of a scope's running (or queued) job that leaves the next one blocked.
    "delete_keeps_the_scope_blocked": Mutant(
        "pgqueue._drop_edges()",
        "IF v_scopes IS NOT NULL THEN",
        "IF false THEN",
        "test_scope_heads.py::test_a_hand_delete_of_the_scopes_active_job_lets_the_next_run[running]",
    ),
    # A scoped enqueue under REPEATABLE READ entered blocked behind a job its snapshot
    # still sees active.
    "enqueue_blocks_under_repeatable_read": Mutant(
        "pgqueue._behind_older(jsonb,bigint)",
        "SELECT current_setting('transaction_isolation') IN ('read committed', 'read uncommitted')\n"
        "       AND EXISTS",
        "SELECT EXISTS",
        "test_scope_heads.py::test_an_enqueue_under_repeatable_read_never_enters_blocked_behind_an_ended_job[waits-for-the-completion]",
    ),
    # A scoped transition run under REPEATABLE READ.
    "scope_transition_under_repeatable_read": Mutant(
        "pgqueue._lock_scope_order(jsonb[])",
        "IF cardinality(p_scopes) > 0\n",
        "IF false\n",
        "test_scope_heads.py::test_a_transition_of_a_scoped_job_refuses_repeatable_read[complete]",
    ),
    # A retry reviving the dependents its first, unlocked read found.
    "retry_trusts_its_first_read": Mutant(
        "pgqueue.retry(bigint)",
        "WHERE w.id = ANY (v_downstream) AND pgqueue._revivable(w, v.pipeline_id));",
        "WHERE w.id = ANY (v_downstream));",
        "test_pipelines.py::test_a_retry_waits_for_a_dependents_busy_pipeline_before_locking_any_row[cancel_pipeline]",
    ),
    # retry not taking the pipeline locks of the dependents it revives.
    "retry_takes_no_dependents_pipeline_lock": Mutant(
        "pgqueue.retry(bigint)",
        "WHERE NOT pg_try_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext(p.pipeline_id::text))",
        "WHERE false",
        "test_pipelines.py::test_a_cancel_pipeline_during_a_retry_cancels_what_the_retry_revives",
        ((RETRY_PRE_LOCK, "PERFORM pgqueue._lock_pipelines(ARRAY[v.pipeline_id]);"),),
    ),
    # retry taking its dependents' pipeline locks only after its rows, by try: it refused
    # whenever a member of such a pipeline was being completed, failed or released.
    "retry_tries_dependents_pipelines_after_its_rows": Mutant(
        "pgqueue.retry(bigint)",
        RETRY_PRE_LOCK,
        "PERFORM pgqueue._lock_pipelines(ARRAY[v.pipeline_id]);",
        "test_pipelines.py::test_a_retry_waits_for_a_dependents_busy_pipeline_before_locking_any_row",
    ),
    # An enqueue naming several pipelines locking them in id order, not key order.
    "enqueue_locks_pipelines_in_id_order": Mutant(
        "pgqueue._insert_specs(jsonb,uuid,bigint,text,boolean,integer)",
        "ORDER BY hashtext(p.id::text), p.id",
        "ORDER BY p.id",
        "test_pipelines.py::test_an_enqueue_into_several_pipelines_locks_them_in_key_order",
    ),
    # retry waiting for its dependents' pipelines in a transaction that holds rows already.
    "retry_waits_for_dependents_pipelines_holding_rows": Mutant(
        "pgqueue.retry(bigint)",
        "AND pg_current_xact_id_if_assigned() IS NULL));",
        "));",
        "test_pipelines.py::test_a_retry_after_another_in_one_transaction_only_tries_its_dependents_pipelines",
    ),
    # retry reviving a dependent created meanwhile without its pipeline's lock.
    "retry_skips_the_pipeline_of_a_dependent_created_meanwhile": Mutant(
        "pgqueue.retry(bigint)",
        "WHERE NOT pg_try_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext(p.pipeline_id::text))",
        "WHERE false",
        "test_pipelines.py::test_a_retry_refuses_when_the_pipeline_of_a_dependent_created_meanwhile_is_busy",
    ),
    # The scopes' next jobs unblocked by an UPDATE joined to them: locked in scope-hash order.
    "unblock_next_locks_heads_in_scope_order": Mutant(
        "pgqueue._unblock_next(jsonb[],bigint[])",
        "WHERE j.id = ANY (ARRAY(SELECT h.id FROM heads h WHERE h.scope_blocked))",
        "FROM heads h WHERE j.id = h.id AND h.scope_blocked",
        "test_scope_heads.py::test_a_completion_unblocks_the_next_jobs_of_its_scopes_in_id_order",
    ),
    # prune locking the jobs it deletes in the order its plan reads them.
    "prune_locks_in_plan_order": Mutant(
        "pgqueue.prune(interval)",
        "ORDER BY o.id FOR UPDATE))",
        "FOR UPDATE))",
        "test_retention.py::test_prune_locks_the_jobs_it_deletes_in_id_order",
    ),
    # A queued dependency an enqueue holds (claims skip it) announced by nobody at its commit.
    "held_dependency_unannounced": Mutant(
        "pgqueue._lock_dependencies(bigint[],text)",
        "PERFORM pgqueue._announce_held(p_ids);",
        "PERFORM 1;",
        "test_notify.py::test_a_queued_job_a_transaction_held_is_announced_at_its_commit[depends_on]",
    ),
    # The queued job an enqueue's dedup key merged into (and holds) announced by nobody.
    "held_dedup_merge_unannounced": Mutant(
        "pgqueue.enqueue(text,jsonb,text,jsonb,text,timestamp with time zone,integer,integer,uuid,jsonb,bigint[])",
        "PERFORM pgqueue._announce_held(ARRAY[v_id]);",
        "NULL;",
        "test_notify.py::test_a_queued_job_a_transaction_held_is_announced_at_its_commit[dedup_key]",
    ),
}


async def apply(conn: asyncpg.Connection, name: str) -> None:
    mutant = MUTANTS[name]
    if mutant.function.startswith("view "):
        view = mutant.function.removeprefix("view ")
        body = await conn.fetchval("SELECT pg_get_viewdef($1::regclass)", view)
        definition = f"CREATE OR REPLACE VIEW {view} AS {body}"
    else:
        definition = await conn.fetchval(
            "SELECT pg_get_functiondef($1::regprocedure)", mutant.function
        )
    for old, new in ((mutant.old, mutant.new), *mutant.more):
        if old not in definition:
            raise AssertionError(f"mutant {name}: text to replace not found in {mutant.function}")
        definition = definition.replace(old, new)
    await conn.execute(definition)
