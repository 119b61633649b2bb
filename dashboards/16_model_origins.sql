-- Every model behind a current result, by stage: random-init (a stand-in built from its
-- config: what it produced means nothing) or pretrained (real weights), with the first
-- characters of its weights' sha256, from the fingerprints recorded with every item.
WITH m AS (
  SELECT stage, item_id, model_fingerprints_json AS fp,
         unnest(json_keys(model_fingerprints_json)) AS model
  FROM current_items
  WHERE status = 'done' AND coalesce(model_fingerprints_json, '{}') <> '{}')
SELECT stage AS used_by, model,
       json_extract_string(fp, '$."' || model || '".origin') AS origin,
       left(json_extract_string(fp, '$."' || model || '".sha256'), 12) AS weights_sha256,
       count(DISTINCT item_id) AS items
FROM m GROUP BY ALL ORDER BY used_by, model
