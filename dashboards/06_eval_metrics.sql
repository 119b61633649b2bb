-- Evaluation table: one row per model family, checkpoint, setting (self / cross audio),
-- metric and row (generated vs the ground-truth reference row); clip metrics are means
-- over clips, set metrics (FID, FVD, fvd_at_N) one value. model_origin says whether the
-- metric networks were random-init stand-ins (numbers then mean nothing) or pretrained.
SELECT family, checkpoint, setting, metric, level,
       max(mean) FILTER (WHERE row = 'generated') AS generated,
       max(mean) FILTER (WHERE row = 'ground_truth') AS ground_truth,
       max(clips) AS clips, max(model_origin) AS model_origin
FROM eval_summary
GROUP BY family, checkpoint, setting, metric, level
ORDER BY family, checkpoint, setting, level, metric
