-- Every model behind a current number, random-init (a stand-in built from its config:
-- the numbers it produced mean nothing) or pretrained (real weights): feature extractors
-- (SenseVoice among them) and the evaluation's metric networks.
SELECT 'features' AS used_by, family AS role, model_name AS model, model_origin AS origin,
       count(DISTINCT item_id) AS items
FROM current_features GROUP BY ALL
UNION ALL
SELECT 'evaluation', metric, 'network of ' || metric, model_origin, count(DISTINCT item_id)
FROM current_eval_metrics WHERE row = 'generated' GROUP BY ALL
ORDER BY used_by, role
