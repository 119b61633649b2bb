SELECT stage, run_id, count(*) AS items,
       round(avg(duration_s), 3) AS mean_s_per_item,
       round(max(duration_s), 3) AS max_s_per_item,
       count(DISTINCT worker) AS workers
FROM items
WHERE run_id IN (SELECT run_id FROM runs WHERE event = 'started'
                 ORDER BY event_at DESC LIMIT 5)
GROUP BY stage, run_id
ORDER BY run_id DESC, stage
