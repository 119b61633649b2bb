SELECT dataset,
       count(*) AS clips,
       round(sum(duration_s) / 3600, 3) AS hours,
       round(min(duration_s), 2) AS min_s,
       round(median(duration_s), 2) AS median_s,
       round(max(duration_s), 2) AS max_s,
       list_distinct(list(fps)) AS fps_values,
       list_distinct(list(width || 'x' || height)) AS resolutions
FROM current_clips
GROUP BY dataset
ORDER BY dataset
