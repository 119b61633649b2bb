-- Per dataset and quality rule: clips that passed on a measurement, failed (removed when the
-- rule is hard) and unmeasured: passed only by default because the rule could not measure
-- (av_offset without a confident estimate), never counted as a pass. Then the score spread,
-- and a flag for rules that fail every clip, none, or measure none.
SELECT dataset, rule, hard, clips, passed, failed, unmeasured, failed_pct, removed,
       removed_only_here, threshold, mean_value, min, p10, p50, p90, max, attention
FROM quality_rules
