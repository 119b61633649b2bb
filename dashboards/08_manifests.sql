-- Published metadata per dataset (before and during download): licence, clips, hours,
-- speakers, languages, unusable rows, and how far the download has got.
SELECT s.dataset, s.licence, s.clips, s.bad_rows, s.hours, s.source_videos, s.speakers,
       s.languages,
       count(*) FILTER (WHERE p.download_status = 'done') AS downloaded,
       count(*) FILTER (WHERE p.download_status = 'failed') AS download_failed,
       count(*) FILTER (WHERE p.download_status = 'pending') AS pending
FROM manifest_summary s LEFT JOIN clip_progress p USING (dataset)
GROUP BY ALL ORDER BY s.dataset
