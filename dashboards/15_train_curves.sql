-- Training curves of every committed checkpoint: loss, learning rate, gradient norm and
-- throughput per step, the family and training stage, the checkpoint artifact, and
-- whether it is the checkpoint the current plans hold.
SELECT coalesce(m.family, json_extract_string(i.record_json, '$.family')) AS family,
       coalesce(m.training_stage, json_extract_string(i.record_json, '$.training_stage'),
                'main') AS training_stage,
       json_extract_string(i.record_json, '$.checkpoint.artifact_id') AS checkpoint,
       i.run_id, m.step, m.loss, m.lr, m.grad_norm, m.samples_per_s, m.num_processes,
       c.item_key IS NOT NULL AS current
FROM train_metrics m
JOIN items i ON i.stage = 'train' AND i.status = 'done' AND i.item_id = m.item_id
            AND i.item_key = m.item_key AND i.run_id = m.run_id
LEFT JOIN current_items c ON c.stage = 'train' AND c.item_key = i.item_key
ORDER BY checkpoint, m.step
