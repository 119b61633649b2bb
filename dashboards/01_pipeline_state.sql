SELECT stage,
       count(*) FILTER (WHERE status = 'done') AS done,
       count(*) FILTER (WHERE status = 'filtered') AS filtered,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) AS total
FROM current_items
GROUP BY stage
ORDER BY min(created_at)
