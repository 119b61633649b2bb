-- Every run, newest first: how it ended (started = still running, or killed without an
-- end row), how long it took, what it was asked and by whom (CLI, deployment, Python).
SELECT s.run_id, s.event_at AS started_at, l.event AS state,
       CASE WHEN l.event <> 'started' THEN l.event_at END AS ended_at,
       round(epoch(coalesce(CASE WHEN l.event <> 'started' THEN l.event_at END, now())
                   - s.event_at), 1) AS seconds,
       array_to_string(s.stages, ',') AS stages, s.command, l.message
FROM runs s JOIN runs_latest l USING (run_id)
WHERE s.event = 'started'
ORDER BY s.event_at DESC
LIMIT 200
