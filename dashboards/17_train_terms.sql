-- Training curves of every committed training run (current or not), 20 points per run:
-- per family, training stage and run (item_key), the mean of each loss term ('loss' is what
-- the optimiser minimised, the others come from terms_json), lr, gradient norm (before
-- clipping) and samples/s over each twentieth of the steps. Full per-step series:
-- SELECT step, loss, terms_json, lr, grad_norm, samples_per_s FROM train_metrics WHERE ...
WITH steps AS (
  SELECT family, training_stage, item_key, step, 'loss' AS term, loss AS value, lr, grad_norm,
         samples_per_s, max(step) OVER (PARTITION BY item_key) AS last_step
  FROM train_metrics
  UNION ALL
  SELECT t.family, t.training_stage, t.item_key, t.step, j.key AS term,
         CAST(j.value AS DOUBLE) AS value, t.lr, t.grad_norm, t.samples_per_s,
         max(t.step) OVER (PARTITION BY t.item_key) AS last_step
  FROM train_metrics t, json_each(t.terms_json) j
)
SELECT family, training_stage, left(item_key, 12) AS run, term,
       min(step) AS from_step, max(step) AS to_step,
       round(avg(value), 5) AS value, avg(lr) AS lr,
       round(avg(grad_norm), 4) AS grad_norm, round(avg(samples_per_s), 1) AS samples_per_s
FROM steps
GROUP BY family, training_stage, item_key, term, floor((step - 1) * 20 / last_step)
ORDER BY family, training_stage, run, term, from_step
