-- The current evaluation table (the evaluate_set stage's eval_summary): every metric of every
-- model family, checkpoint and setting (self: the clip's own audio; cross: another held-out
-- clip's audio) beside the ground truth scored the same way (the reference row of the MuseTalk
-- paper's table: PSNR cap, SSIM 1, CSIM 1, FID/FVD 0, the real clips' Sync-C/D). Clip metrics
-- are means over the held-out clips (std beside them); fid, fvd and fvd_at_N are set-level.
-- model_origin 'random-init': the metric networks are stand-ins, the numbers only check the
-- plumbing. Every run's table stays in eval_summary (filter by run_id).
SELECT g.setting, g.family, g.checkpoint, g.metric, g.level,
       round(g.value, 4) AS generated, round(t.value, 4) AS ground_truth,
       round(g.std, 4) AS std, g.higher_is_better, g.num_clips AS clips,
       g.generator_origin, g.model_origin, g.run_id
FROM current_eval_summary g
LEFT JOIN current_eval_summary t
  ON t.family = 'ground_truth' AND t.setting = g.setting AND t.metric = g.metric
WHERE g.family <> 'ground_truth'
ORDER BY g.setting DESC, g.family, g.checkpoint, g.level, g.metric
