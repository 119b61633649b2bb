-- Training curves of every committed checkpoint: loss and learning rate per step, the
-- family trained, the checkpoint artifact, and whether it is the current one.
SELECT json_extract_string(i.record_json, '$.family') AS family,
       json_extract_string(i.record_json, '$.checkpoint.artifact_id') AS checkpoint,
       i.run_id, m.step, m.loss, m.lr, m.num_processes,
       c.item_key IS NOT NULL AS current
FROM train_metrics m
JOIN items i ON i.stage = 'train' AND i.status = 'done' AND i.item_id = m.item_id
            AND i.item_key = m.item_key AND i.run_id = m.run_id
LEFT JOIN current_items c ON c.stage = 'train' AND c.item_key = i.item_key
ORDER BY checkpoint, m.step
