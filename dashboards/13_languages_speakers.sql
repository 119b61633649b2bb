-- Per dataset and language (as published in the metadata): clips, hours and speakers.
SELECT dataset, coalesce(nullif(language, ''), 'not stated') AS language,
       count(*) AS clips, round(sum(duration_s) / 3600, 4) AS hours,
       count(DISTINCT nullif(speaker, '')) AS speakers
FROM current_manifest WHERE status = 'ok'
GROUP BY ALL ORDER BY dataset, clips DESC
