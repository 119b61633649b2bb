-- Per run (the latest 50) and stage: what the run planned and what it has finished so far.
-- to_run = items the run executes (the rest were cached or skipped as permanent failures);
-- pending = to_run items with no result from this run yet (still running, or killed).
WITH recent AS (SELECT run_id, event_at FROM runs WHERE event = 'started'
                ORDER BY event_at DESC LIMIT 50),
     p AS (SELECT * FROM plans WHERE run_id IN (SELECT run_id FROM recent)
           QUALIFY row_number() OVER (PARTITION BY run_id, stage, item_id
                                      ORDER BY planned_at DESC) = 1),
     r AS (SELECT run_id, stage, item_id, arg_max(status, created_at) AS status FROM items
           WHERE run_id IN (SELECT run_id FROM recent) GROUP BY run_id, stage, item_id)
SELECT p.run_id, p.stage,
       count(*) FILTER (WHERE p.action <> 'dropped') AS planned,
       count(*) FILTER (WHERE p.action = 'cached') AS cached,
       count(*) FILTER (WHERE p.action = 'skip_failed') AS skipped_failed,
       count(*) FILTER (WHERE p.action = 'run') AS to_run,
       count(*) FILTER (WHERE p.action = 'run' AND r.status = 'done') AS done,
       count(*) FILTER (WHERE p.action = 'run' AND r.status = 'filtered') AS filtered,
       count(*) FILTER (WHERE p.action = 'run' AND r.status = 'failed') AS failed,
       count(*) FILTER (WHERE p.action = 'run' AND r.status IS NULL) AS pending
FROM p LEFT JOIN r USING (run_id, stage, item_id)
GROUP BY p.run_id, p.stage
ORDER BY p.run_id DESC, min(p.planned_at)
