-- Per run (the latest 50) and stage: what the run planned and what it has finished so far.
-- to_run = items the run executes (the rest were cached or skipped as permanent failures);
-- pending = to_run items with no result from this run yet (still running, or killed).
-- The plan's counts come from stage_runs (one row per plan), the results from the run's
-- own item rows, so this costs the same however large the stages or their history.
WITH recent AS (SELECT run_id, event_at FROM runs WHERE event = 'started'
                ORDER BY event_at DESC LIMIT 50),
     s AS (SELECT * FROM stage_runs WHERE run_id IN (SELECT run_id FROM recent)
           QUALIFY row_number() OVER (PARTITION BY run_id, stage ORDER BY planned_at DESC) = 1),
     r AS (SELECT run_id, stage, item_id, arg_max(status, created_at) AS status FROM items
           WHERE run_id IN (SELECT run_id FROM recent) AND coalesce(worker, '') <> 'discover'
           GROUP BY run_id, stage, item_id),
     n AS (SELECT run_id, stage, count(*) FILTER (WHERE status = 'done') AS done,
                  count(*) FILTER (WHERE status = 'filtered') AS filtered,
                  count(*) FILTER (WHERE status = 'failed') AS failed
           FROM r GROUP BY run_id, stage)
SELECT s.run_id, s.stage,
       s.items AS planned,
       s.cached_done + s.cached_filtered AS cached,
       s.skip_failed AS skipped_failed,
       s.to_run,
       coalesce(n.done, 0) AS done,
       coalesce(n.filtered, 0) AS filtered,
       coalesce(n.failed, 0) AS failed,
       greatest(s.to_run - coalesce(n.done, 0) - coalesce(n.filtered, 0)
                - coalesce(n.failed, 0), 0) AS pending
FROM s LEFT JOIN n USING (run_id, stage)
ORDER BY s.run_id DESC, s.planned_at
