-- Every version of every stage's outputs (code version, stage config, model weights):
-- items and runs that wrote it, when, and whether it is the version current plans hold.
SELECT i.stage, i.code_version, left(i.config_hash, 12) AS config_hash,
       left(md5(coalesce(i.model_fingerprints_json, '')), 12) AS models_hash,
       count(DISTINCT i.item_id) AS items, count(*) FILTER (WHERE i.status = 'done') AS done,
       count(DISTINCT i.run_id) AS runs, min(i.created_at) AS first_at,
       max(i.created_at) AS last_at, bool_or(p.item_key IS NOT NULL) AS current
FROM items i LEFT JOIN current_plans p
  ON p.stage = i.stage AND p.item_id = i.item_id AND p.item_key = i.item_key
GROUP BY i.stage, i.code_version, i.config_hash, models_hash
ORDER BY i.stage, first_at
