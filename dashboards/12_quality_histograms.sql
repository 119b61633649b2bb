-- Score distribution of every quality rule: 20 equal-width bins per rule between its
-- smallest and largest finite value, with the clips per bin that passed on a measurement,
-- failed, or were unmeasured (passed by default), and the rule's threshold.
-- Non-finite scores (NaN) are left out here; 03_quality_rules.sql counts them.
WITH q AS (SELECT rule, value, threshold, hard, passed,
                  NOT coalesce(measured, NOT starts_with(reason, 'unmeasured')) AS unmeasured
           FROM current_quality WHERE value IS NOT NULL AND isfinite(value)),
     r AS (SELECT rule, min(value) AS lo, max(value) AS hi FROM q GROUP BY rule),
     b AS (SELECT q.*, r.lo, r.hi,
                  CASE WHEN r.hi = r.lo THEN 0
                       ELSE least(floor((q.value - r.lo) / (r.hi - r.lo) * 20), 19) END AS bin
           FROM q JOIN r USING (rule))
SELECT rule, bin::INTEGER AS bin,
       any_value(lo) + (any_value(hi) - any_value(lo)) * bin / 20 AS bin_from,
       any_value(lo) + (any_value(hi) - any_value(lo)) * (bin + 1) / 20 AS bin_to,
       count(*) FILTER (WHERE passed AND NOT unmeasured) AS passed,
       count(*) FILTER (WHERE NOT passed) AS failed,
       count(*) FILTER (WHERE unmeasured) AS unmeasured,
       any_value(threshold) AS threshold, bool_or(hard) AS hard
FROM b GROUP BY rule, bin ORDER BY rule, bin
